use proptest::prelude::*;

use super::*;

fn query(flags: u16, qd: u16, name: &[u8], qtype: u16, additional: &[u8]) -> Vec<u8> {
    let mut m = vec![0x12, 0x34];
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&qd.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 0, u8::from(!additional.is_empty())]);
    m.extend_from_slice(name);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    m.extend_from_slice(additional);
    m
}

const NAME: &[u8] = b"\x03WeB\x07default\x03svc\x07cluster\x05local\x00";
const OPT_4096: &[u8] = &[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0];

#[test]
fn parses_a_query_lowercasing_the_key() {
    let m = query(0x0100, 1, NAME, rtype::A, &[]);
    let q = parse(&m).expect("parses");
    assert_eq!(q.id, 0x1234);
    assert!(q.rd);
    assert_eq!(q.qtype, rtype::A);
    assert_eq!(q.key(), b"\x03web\x07default\x03svc\x07cluster\x05local\x00");
    assert_eq!(q.label(0), Some(&b"web"[..]));
    assert_eq!(q.label(4), Some(&b"local"[..]));
    assert_eq!(q.label(5), None);
    assert_eq!(q.labels_before(b"\x07cluster\x05local\x00"), Some(3));
    assert_eq!(q.labels_before(b"\x05local\x00"), Some(4));
    assert_eq!(q.labels_before(b"\x03ter\x05local\x00"), None, "only at label boundaries");
    assert_eq!(q.labels_before(b"\x00"), Some(5));
    assert_eq!(q.edns, None);
    assert_eq!(q.udp_limit(), UDP_MIN);
    assert_eq!(DisplayName(q.key()).to_string(), "web.default.svc.cluster.local.");
}

#[test]
fn edns_size_is_clamped() {
    let q = parse(&query(0, 1, NAME, rtype::A, OPT_4096)).expect("parses");
    assert_eq!(q.edns, Some(4096));
    assert_eq!(q.udp_limit(), UDP_MAX);
    let small = [0, 0, 41, 0, 100, 0, 0, 0, 0, 0, 0];
    assert_eq!(parse(&query(0, 1, NAME, rtype::A, &small)).expect("parses").udp_limit(), UDP_MIN);
}

#[test]
fn rejects() {
    let code = |m: &[u8]| parse(m).err().map(|(r, _)| r);
    assert_eq!(code(&[0; 5]), Some(Reject::Drop));
    assert_eq!(code(&query(0x8000, 1, NAME, 1, &[])), Some(Reject::Drop), "responses are dropped");
    assert_eq!(code(&query(0, 0, NAME, 1, &[])), Some(Reject::Code(Rcode::FormErr)));
    assert_eq!(code(&query(0, 2, NAME, 1, &[])), Some(Reject::Code(Rcode::FormErr)));
    assert_eq!(code(&query(5 << 11, 1, NAME, 1, &[])), Some(Reject::Code(Rcode::NotImp)));
    assert_eq!(code(&query(0, 1, b"\xC0\x0C", 1, &[])), Some(Reject::Code(Rcode::FormErr)));
    let long_label = [&[64u8][..], &[b'a'; 64], &[0]].concat();
    assert_eq!(code(&query(0, 1, &long_label, 1, &[])), Some(Reject::Code(Rcode::FormErr)));
    let long_name: Vec<u8> = (0..5).flat_map(|_| [&[60u8][..], &[b'a'; 60]].concat()).chain([0]).collect();
    assert_eq!(code(&query(0, 1, &long_name, 1, &[])), Some(Reject::Code(Rcode::FormErr)));
    let badvers = [0, 0, 41, 0x10, 0, 0, 1, 0, 0, 0, 0];
    assert_eq!(code(&query(0, 1, NAME, 1, &badvers)), Some(Reject::BadVers));
    let two_opts = [OPT_4096, OPT_4096].concat();
    let mut m = query(0, 1, NAME, 1, &two_opts);
    m[11] = 2;
    assert_eq!(code(&m), Some(Reject::Code(Rcode::FormErr)));
    let mut chaos = query(0, 1, NAME, 1, &[]);
    let n = chaos.len();
    chaos[n - 1] = 3;
    assert_eq!(code(&chaos), Some(Reject::Code(Rcode::NotImp)));
}

#[test]
fn writer_echoes_the_question_and_truncates() {
    let m = query(0x0100, 1, NAME, rtype::A, OPT_4096);
    let q = parse(&m).expect("parses");
    let mut buf = Vec::new();
    let mut w = Writer::start(&mut buf, &m, &q, Rcode::NoError, true);
    let a = rr(rtype::A, 30, &[10, 0, 0, 1]);
    w.answer_at_qname(&a);
    w.finish(&q, 512);
    assert_eq!(&buf[..2], &[0x12, 0x34]);
    assert_eq!(buf[2] & 0x84, 0x84, "QR and AA");
    assert_eq!(&buf[6..8], &[0, 1], "one answer");
    assert_eq!(&buf[10..12], &[0, 1], "OPT");
    assert_eq!(&buf[12..12 + NAME.len()], NAME, "question echoed with its case");

    let mut w = Writer::start(&mut buf, &m, &q, Rcode::NoError, true);
    for _ in 0..100 {
        w.answer_at_qname(&a);
    }
    w.finish(&q, 512);
    assert_eq!(buf[2] & 0x02, 0x02, "TC");
    assert_eq!(&buf[6..8], &[0, 0]);
    assert!(buf.len() <= 512);
}

#[test]
fn encodes_names() {
    assert_eq!(encode_name("a.Bc").as_deref(), Some(&b"\x01a\x02Bc\x00"[..]));
    assert_eq!(encode_name("a.bc.").as_deref(), Some(&b"\x01a\x02bc\x00"[..]));
    assert_eq!(encode_name("").as_deref(), Some(&b"\x00"[..]));
    assert_eq!(encode_name("a..b"), None);
    assert_eq!(encode_name(&"a".repeat(64)), None);
}

proptest! {
    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(q) = parse(&bytes) {
            let mut buf = Vec::new();
            Writer::start(&mut buf, &bytes, &q, Rcode::NoError, false).finish(&q, q.udp_limit());
            prop_assert!(buf.len() <= q.udp_limit());
        }
    }

    #[test]
    fn valid_queries_round_trip(labels in proptest::collection::vec("[a-zA-Z0-9-]{1,20}", 1..6), qtype in any::<u16>()) {
        let name = encode_name(&labels.join(".")).expect("valid");
        let m = query(0, 1, &name, qtype, &[]);
        let q = parse(&m).expect("parses");
        prop_assert_eq!(q.qtype, qtype);
        let mut lower = name.clone();
        lowercase(&mut lower);
        prop_assert_eq!(q.key(), &lower[..]);
    }
}

#[test]
fn additional_records_are_dropped_before_truncating() {
    let m = query(0, 1, NAME, rtype::SRV, &[]);
    let q = parse(&m).expect("parses");
    let mut buf = Vec::new();
    let a = rr(rtype::A, 30, &[10, 0, 0, 1]);
    let srv = rr(rtype::SRV, 30, &srv_rdata(0, 100, 80, NAME));
    let mut w = Writer::start(&mut buf, &m, &q, Rcode::NoError, true);
    w.answer_at_qname(&srv);
    for _ in 0..20 {
        w.additional(NAME, &a);
    }
    w.finish(&q, 512);
    assert_eq!(buf[2] & 0x02, 0, "no TC: only the additional section was dropped");
    assert_eq!(&buf[6..8], &[0, 1]);
    assert_eq!(&buf[10..12], &[0, 0]);

    let mut w = Writer::start(&mut buf, &m, &q, Rcode::NoError, true);
    w.answer_at_qname(&srv);
    w.additional(NAME, &a);
    w.finish(&q, 512);
    assert_eq!(&buf[10..12], &[0, 1], "kept when it fits");
}
