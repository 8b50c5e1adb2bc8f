//! Plumbing that lets `externalTrafficPolicy: Local` keep the client's source address.
//!
//! For an outside client of an eTP=Local frontend, Ferry connects to the local endpoint from the
//! client's own IP (an `IP_TRANSPARENT` socket, see `crate::tcp`), as kube-proxy's DNAT without
//! SNAT does. The endpoint then replies *to the client's address*; without help the node would
//! route that reply out towards the client, past Ferry. Three pieces deliver it to Ferry's socket:
//!
//! ```text
//! table inet ferry { chain prerouting { type filter hook prerouting priority mangle;
//!     meta l4proto tcp socket transparent 1 meta mark set 0xf3 } }   # a reply to a transparent socket
//! ip rule add fwmark 0xf3 lookup 243                                  # (IPv4 and IPv6)
//! ip route add local default dev lo table 243                         # is delivered locally
//! ```
//!
//! The nftables table is replaced atomically (`nft -f`); rules and routes are added only when
//! missing, so [`ensure`] is idempotent and a restart adopts what the previous process left.
//! [`cleanup`] removes all three. Only packets that match an existing transparent socket are
//! marked, so no other traffic of the node changes path.

use std::{io::Write as _, process::Command};

use super::HostError;

/// Firewall mark of replies that belong to a transparent upstream socket.
pub const FWMARK: u32 = 0xf3;
/// Routing table that delivers marked packets locally.
pub const TABLE: u32 = 243;
/// The nftables table Ferry owns.
pub const NFT_TABLE: &str = "ferry";

/// The ruleset [`ensure`] loads: it creates the table, empties it, and fills it in one transaction.
fn ruleset() -> String {
    format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n  \
         chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n    \
         meta l4proto tcp socket transparent 1 meta mark set {FWMARK:#x}\n  }}\n}}\n"
    )
}

/// Installs the mark rule, the policy-routing rules and the local routes (IPv4 and IPv6).
pub fn ensure() -> Result<(), HostError> {
    nft(&ruleset())?;
    for family in ["-4", "-6"] {
        let mark = format!("{FWMARK:#x}");
        let table = TABLE.to_string();
        let rules = output("ip", &[family, "rule", "show", "fwmark", &mark])?;
        if !rules.contains(&format!("lookup {table}")) {
            run("ip", &[family, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        }
        run("ip", &[family, "route", "replace", "local", "default", "dev", "lo", "table", &table])?;
    }
    Ok(())
}

/// Removes what [`ensure`] installed; missing pieces are not an error.
pub fn cleanup() -> Result<(), HostError> {
    let _ = nft(&format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"));
    for family in ["-4", "-6"] {
        let mark = format!("{FWMARK:#x}");
        let table = TABLE.to_string();
        while output("ip", &[family, "rule", "show", "fwmark", &mark])?.contains(&format!("lookup {table}")) {
            run("ip", &[family, "rule", "del", "fwmark", &mark, "lookup", &table])?;
        }
        let _ = run("ip", &[family, "route", "flush", "table", &table]);
    }
    Ok(())
}

fn nft(script: &str) -> Result<(), HostError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| HostError::Command {
            command: "nft -f -".to_owned(),
            detail: source.to_string(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|source| HostError::Command {
            command: "nft -f -".to_owned(),
            detail: source.to_string(),
        })?;
    }
    let out = child.wait_with_output().map_err(|source| HostError::Command {
        command: "nft -f -".to_owned(),
        detail: source.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HostError::Command {
            command: "nft -f -".to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn output(program: &str, args: &[&str]) -> Result<String, HostError> {
    let out = Command::new(program).args(args).output().map_err(|source| HostError::Command {
        command: format!("{program} {}", args.join(" ")),
        detail: source.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HostError::Command {
            command: format!("{program} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), HostError> {
    output(program, args).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_the_table_atomically_and_marks_only_transparent_sockets() {
        let r = ruleset();
        assert!(r.starts_with("table inet ferry\ndelete table inet ferry\n"), "{r}");
        assert!(r.contains("socket transparent 1 meta mark set 0xf3"), "{r}");
    }
}
