//! DNS wire format for the hot path: parsing one query and writing answers from pre-encoded
//! resource records (RFC 1035 §4, EDNS0 per RFC 6891).
//!
//! Invariants:
//! - [`parse`] never panics and never allocates: every read is bounds-checked, names are at most
//!   255 octets and 127 labels, and at most [`MAX_ADDITIONALS`] additional records are examined.
//! - The question is echoed byte for byte, so the query's case is preserved; lookups use the
//!   lowercased copy in [`Query::key`].
//! - Answers on the query name use a compression pointer to the question (`0xC00C`), so
//!   pre-encoded records do not depend on the name asked.

use std::fmt;

/// Header length.
pub(crate) const HEADER_LEN: usize = 12;
/// The largest name in wire form (RFC 1035 §2.3.4).
pub(crate) const MAX_NAME: usize = 255;
/// Additional records examined for an OPT record.
pub(crate) const MAX_ADDITIONALS: u16 = 4;
/// UDP payload size without EDNS0.
pub(crate) const UDP_MIN: usize = 512;
/// The UDP payload size Ferry advertises and caps EDNS0 requests at (DNS flag day 2020).
pub(crate) const UDP_MAX: usize = 1232;

/// Record types Ferry answers or names in metrics.
pub(crate) mod rtype {
    pub(crate) const A: u16 = 1;
    pub(crate) const NS: u16 = 2;
    pub(crate) const CNAME: u16 = 5;
    pub(crate) const SOA: u16 = 6;
    pub(crate) const PTR: u16 = 12;
    pub(crate) const TXT: u16 = 16;
    pub(crate) const AAAA: u16 = 28;
    pub(crate) const SRV: u16 = 33;
    pub(crate) const OPT: u16 = 41;
    pub(crate) const IXFR: u16 = 251;
    pub(crate) const AXFR: u16 = 252;
    pub(crate) const ANY: u16 = 255;
}

/// Class IN.
pub(crate) const CLASS_IN: u16 = 1;
/// Class ANY (QCLASS only).
pub(crate) const CLASS_ANY: u16 = 255;

/// Response codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

impl Rcode {
    /// All codes, in the order metrics handles are created.
    pub(crate) const ALL: [Self; 6] =
        [Self::NoError, Self::FormErr, Self::ServFail, Self::NxDomain, Self::NotImp, Self::Refused];

    /// The conventional upper-case name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::NoError => "NOERROR",
            Self::FormErr => "FORMERR",
            Self::ServFail => "SERVFAIL",
            Self::NxDomain => "NXDOMAIN",
            Self::NotImp => "NOTIMP",
            Self::Refused => "REFUSED",
        }
    }
}

/// Why a message is not answered normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Too short to carry an ID, or a response: dropped silently.
    Drop,
    /// Answer with this code and an empty body (the question echoed when it parsed).
    Code(Rcode),
    /// EDNS version other than 0: BADVERS (extended RCODE 16).
    BadVers,
}

/// A parsed query. Borrowed from the packet: no allocation.
#[derive(Clone, Copy)]
pub(crate) struct Query {
    pub(crate) id: u16,
    /// Recursion desired.
    pub(crate) rd: bool,
    /// Checking disabled (echoed).
    pub(crate) cd: bool,
    pub(crate) qtype: u16,
    pub(crate) qclass: u16,
    /// Question bytes as received: name, type, class.
    question_end: usize,
    /// Lowercased wire name.
    key: [u8; MAX_NAME],
    key_len: usize,
    /// Start offsets of each label in `key`.
    labels: [u8; 128],
    label_count: usize,
    /// The EDNS0 payload size, when the query had an OPT record.
    pub(crate) edns: Option<u16>,
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Query")
            .field("id", &self.id)
            .field("name", &DisplayName(self.key()))
            .field("qtype", &self.qtype)
            .field("edns", &self.edns)
            .finish()
    }
}

impl Query {
    /// The lowercased wire name (with the root label).
    pub(crate) fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }

    /// Label `i` (lowercased), from the left.
    pub(crate) fn label(&self, i: usize) -> Option<&[u8]> {
        if i >= self.label_count {
            return None;
        }
        let start = usize::from(self.labels[i]);
        let len = usize::from(self.key[start]);
        Some(&self.key[start + 1..start + 1 + len])
    }

    /// How many labels precede `suffix` (a lowercased wire name) if the name ends in it at a label
    /// boundary.
    pub(crate) fn labels_before(&self, suffix: &[u8]) -> Option<usize> {
        let key = self.key();
        if !key.ends_with(suffix) {
            return None;
        }
        let start = key.len() - suffix.len();
        if start == key.len() - 1 {
            return Some(self.label_count);
        }
        (0..self.label_count).find(|&i| usize::from(self.labels[i]) == start)
    }

    /// The largest response this query may get over UDP.
    pub(crate) fn udp_limit(&self) -> usize {
        self.edns.map_or(UDP_MIN, |s| usize::from(s).clamp(UDP_MIN, UDP_MAX))
    }
}

/// A name in wire form, displayed in presentation form (for logs).
pub(crate) struct DisplayName<'a>(pub(crate) &'a [u8]);

impl fmt::Display for DisplayName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let b = self.0;
        if b.first().is_none_or(|l| *l == 0) {
            return f.write_str(".");
        }
        while let Some(&len) = b.get(i) {
            if len == 0 {
                break;
            }
            let label = b.get(i + 1..i + 1 + usize::from(len)).unwrap_or_default();
            for &c in label {
                if c.is_ascii_graphic() && c != b'.' && c != b'\\' {
                    write!(f, "{}", char::from(c))?;
                } else {
                    write!(f, "\\{c:03}")?;
                }
            }
            f.write_str(".")?;
            i += 1 + usize::from(len);
        }
        Ok(())
    }
}

impl fmt::Debug for DisplayName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

/// Parses a query. `Err((Reject, Some(question_end)))` when the question parsed but the message is
/// refused, so the error response can echo it.
pub(crate) fn parse(msg: &[u8]) -> Result<Query, (Reject, Option<usize>)> {
    if msg.len() < HEADER_LEN {
        return Err((Reject::Drop, None));
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 != 0 {
        return Err((Reject::Drop, None));
    }
    let opcode = (flags >> 11) & 0xF;
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let nscount = u16::from_be_bytes([msg[8], msg[9]]);
    let arcount = u16::from_be_bytes([msg[10], msg[11]]);
    if opcode != 0 {
        return Err((Reject::Code(Rcode::NotImp), None));
    }
    if qdcount != 1 {
        return Err((Reject::Code(Rcode::FormErr), None));
    }
    let mut q = Query {
        id,
        rd: flags & 0x0100 != 0,
        cd: flags & 0x0010 != 0,
        qtype: 0,
        qclass: 0,
        question_end: 0,
        key: [0; MAX_NAME],
        key_len: 0,
        labels: [0; 128],
        label_count: 0,
        edns: None,
    };
    let formerr = |end| Err((Reject::Code(Rcode::FormErr), end));
    let mut i = HEADER_LEN;
    loop {
        let Some(&len) = msg.get(i) else { return formerr(None) };
        if len & 0xC0 != 0 {
            // Compression or extended labels in a question: not something a stub sends.
            return formerr(None);
        }
        let len = usize::from(len);
        if q.key_len + 1 + len > MAX_NAME || (len > 0 && q.label_count >= q.labels.len()) {
            return formerr(None);
        }
        let Some(label) = msg.get(i + 1..i + 1 + len) else { return formerr(None) };
        if len > 0 {
            // `key_len < MAX_NAME <= 255`: the offset fits a u8.
            q.labels[q.label_count] = u8::try_from(q.key_len).unwrap_or(u8::MAX);
            q.label_count += 1;
        }
        q.key[q.key_len] = len as u8;
        for (d, s) in q.key[q.key_len + 1..q.key_len + 1 + len].iter_mut().zip(label) {
            *d = s.to_ascii_lowercase();
        }
        q.key_len += 1 + len;
        i += 1 + len;
        if len == 0 {
            break;
        }
    }
    let (Some(qtype), Some(qclass)) = (u16_at(msg, i), u16_at(msg, i + 2)) else { return formerr(None) };
    q.qtype = qtype;
    q.qclass = qclass;
    i += 4;
    q.question_end = i;
    let end = Some(i);
    if ancount != 0 || nscount != 0 {
        return formerr(end);
    }
    // Additional section: look for one OPT record (at most MAX_ADDITIONALS examined).
    for _ in 0..arcount.min(MAX_ADDITIONALS) {
        // Owner name: OPT's is the root; skip any other name without following pointers.
        loop {
            let Some(&len) = msg.get(i) else { return formerr(end) };
            if len & 0xC0 == 0xC0 {
                i += 2;
                break;
            }
            if len & 0xC0 != 0 {
                return formerr(end);
            }
            i += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        let (Some(t), Some(class), Some(ttl_hi), Some(rdlen)) =
            (u16_at(msg, i), u16_at(msg, i + 2), u16_at(msg, i + 4), u16_at(msg, i + 8))
        else {
            return formerr(end);
        };
        i += 10 + usize::from(rdlen);
        if i > msg.len() {
            return formerr(end);
        }
        if t == rtype::OPT {
            if q.edns.is_some() {
                return formerr(end);
            }
            q.edns = Some(class);
            if ttl_hi & 0xFF != 0 {
                return Err((Reject::BadVers, end));
            }
        }
    }
    if qclass != CLASS_IN && qclass != CLASS_ANY {
        return Err((Reject::Code(Rcode::NotImp), end));
    }
    Ok(q)
}

/// Writes responses into a reusable buffer.
///
/// Sections must be written in order: [`Writer::start`], answers, authorities, then
/// [`Writer::finish`], which appends the OPT record and applies the size limit.
pub(crate) struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    answers: u16,
    authorities: u16,
    additionals: u16,
    /// Where the additional section starts, once it has a record.
    additional_start: Option<usize>,
    /// Answers end here (for truncation).
    question_end: usize,
}

impl<'a> Writer<'a> {
    /// Starts a response to `msg` (the raw query), echoing its question.
    pub(crate) fn start(buf: &'a mut Vec<u8>, msg: &[u8], q: &Query, rcode: Rcode, aa: bool) -> Self {
        buf.clear();
        let mut flags: u16 = 0x8000 | 0x0080; // QR, RA
        if q.rd {
            flags |= 0x0100;
        }
        if q.cd {
            flags |= 0x0010;
        }
        if aa {
            flags |= 0x0400;
        }
        flags |= rcode as u16;
        buf.extend_from_slice(&q.id.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        buf.extend_from_slice(&msg[HEADER_LEN..q.question_end]);
        let question_end = buf.len();
        Self { buf, answers: 0, authorities: 0, additionals: 0, additional_start: None, question_end }
    }

    /// A response with no question (the query did not parse far enough), e.g. FORMERR.
    pub(crate) fn error_only(buf: &mut Vec<u8>, msg: &[u8], rcode: Rcode, question_end: Option<usize>) {
        buf.clear();
        let id = [msg.first().copied().unwrap_or(0), msg.get(1).copied().unwrap_or(0)];
        let opcode_rd = msg.get(2).copied().unwrap_or(0) & 0x79;
        buf.extend_from_slice(&id);
        buf.push(0x80 | opcode_rd);
        buf.push(0x80 | rcode as u8);
        let question = question_end.and_then(|end| msg.get(HEADER_LEN..end));
        buf.extend_from_slice(&[0, u8::from(question.is_some()), 0, 0, 0, 0, 0, 0]);
        if let Some(question) = question {
            buf.extend_from_slice(question);
        }
    }

    /// An answer record on the query name: `rr` is type..rdata.
    pub(crate) fn answer_at_qname(&mut self, rr: &[u8]) {
        self.buf.extend_from_slice(&[0xC0, 0x0C]);
        self.buf.extend_from_slice(rr);
        self.answers += 1;
    }

    /// An answer record whose owner is `owner` (wire form).
    pub(crate) fn answer(&mut self, owner: &[u8], rr: &[u8]) {
        self.buf.extend_from_slice(owner);
        self.buf.extend_from_slice(rr);
        self.answers += 1;
    }

    /// A whole pre-encoded record (owner included) in the authority section.
    pub(crate) fn authority(&mut self, record: &[u8]) {
        self.buf.extend_from_slice(record);
        self.authorities += 1;
    }

    /// A record in the additional section (after every answer and authority record), owner
    /// `owner` (wire form). Dropped by [`finish`](Self::finish) rather than truncating when the
    /// message would not fit.
    pub(crate) fn additional(&mut self, owner: &[u8], rr: &[u8]) {
        self.additional_start.get_or_insert(self.buf.len());
        self.buf.extend_from_slice(owner);
        self.buf.extend_from_slice(rr);
        self.additionals += 1;
    }

    /// Whole records already encoded elsewhere (forwarded answers).
    pub(crate) fn raw_answers(&mut self, records: &[u8], count: u16) {
        self.buf.extend_from_slice(records);
        self.answers += count;
    }

    /// Sets the counts, appends OPT when the query had one, and makes the message fit `limit`:
    /// first by dropping the additional section (no TC, RFC 2181 §9), else by dropping every
    /// record and setting TC.
    pub(crate) fn finish(mut self, q: &Query, limit: usize) {
        let opt_len = if q.edns.is_some() { 11 } else { 0 };
        if self.buf.len() + opt_len > limit
            && let Some(start) = self.additional_start
        {
            self.buf.truncate(start);
            self.additionals = 0;
        }
        if self.buf.len() + opt_len > limit {
            self.buf.truncate(self.question_end);
            self.buf[2] |= 0x02;
            self.buf[6..12].copy_from_slice(&[0; 6]);
        } else {
            self.buf[6..8].copy_from_slice(&self.answers.to_be_bytes());
            self.buf[8..10].copy_from_slice(&self.authorities.to_be_bytes());
            self.buf[10..12].copy_from_slice(&self.additionals.to_be_bytes());
        }
        if q.edns.is_some() {
            push_opt(self.buf, 0);
            let ar = u16::from_be_bytes([self.buf[10], self.buf[11]]).saturating_add(1);
            self.buf[10..12].copy_from_slice(&ar.to_be_bytes());
        }
    }
}

/// Appends an OPT record advertising [`UDP_MAX`] with the given extended RCODE (upper 8 bits).
fn push_opt(buf: &mut Vec<u8>, ext_rcode: u8) {
    let size = UDP_MAX as u16;
    buf.push(0);
    buf.extend_from_slice(&rtype::OPT.to_be_bytes());
    buf.extend_from_slice(&size.to_be_bytes());
    buf.extend_from_slice(&[ext_rcode, 0, 0, 0, 0, 0]);
}

/// A BADVERS response (RFC 6891 §6.1.3): extended RCODE 16 = upper bits 1, header RCODE 0.
pub(crate) fn badvers(buf: &mut Vec<u8>, msg: &[u8], question_end: Option<usize>) {
    Writer::error_only(buf, msg, Rcode::NoError, question_end);
    push_opt(buf, 1);
    buf[11] = 1;
}

// === encoding helpers for pre-encoded records ===

/// A presentation-form name (`a.b.c`, no trailing dot needed) in wire form, keeping its case.
/// `None` when a label is empty or longer than 63 octets, or the name is longer than 255.
pub(crate) fn encode_name(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len() + 2);
    let name = name.strip_suffix('.').unwrap_or(name);
    if !name.is_empty() {
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME).then_some(out)
}

/// Lowercases a wire name in place.
pub(crate) fn lowercase(name: &mut [u8]) {
    name.make_ascii_lowercase();
}

/// Encodes type, class IN, TTL, RDLENGTH and `rdata`: a record without its owner.
pub(crate) fn rr(rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + rdata.len());
    out.extend_from_slice(&rtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&u16::try_from(rdata.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(rdata);
    out
}

/// SRV rdata: priority, weight, port, target (never compressed, RFC 2782).
pub(crate) fn srv_rdata(priority: u16, weight: u16, port: u16, target: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + target.len());
    out.extend_from_slice(&priority.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(target);
    out
}

/// SOA rdata.
pub(crate) fn soa_rdata(mname: &[u8], rname: &[u8], serial: u32, minimum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(mname.len() + rname.len() + 20);
    out.extend_from_slice(mname);
    out.extend_from_slice(rname);
    for v in [serial, 7200, 1800, 86400, minimum] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// TXT rdata holding one string (at most 255 octets).
pub(crate) fn txt_rdata(s: &str) -> Vec<u8> {
    let b = &s.as_bytes()[..s.len().min(255)];
    let mut out = Vec::with_capacity(b.len() + 1);
    out.push(b.len() as u8);
    out.extend_from_slice(b);
    out
}

#[cfg(test)]
mod tests;
