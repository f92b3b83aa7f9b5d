//! Who a party is in the protocol: the name it claims under (`<hostname>/<pid>-<random>`, or a
//! given prefix), unique per process.

/// A default identity for this process: `<hostname>/<pid>-<random>`, unique per process so a
/// restarted pod never mistakes its predecessor's claim for its own.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    process_identity(&host)
}

/// `<prefix>/<pid>-<random>`: an identity unique to this process whatever prefix it is given
/// (a pod name is shared by a restarted container and by two sidecars of one pod, which must
/// never take each other's live claim for their own).
pub fn process_identity(prefix: &str) -> String {
    // The suffix takes at most 16 characters ("/" + a 32-bit pid + "-" + 4 hex digits); the
    // prefix is cut so that the whole stays printable and within MAX_IDENTITY_CHARS.
    let prefix = crate::text::sanitize(prefix, crate::text::MAX_IDENTITY_CHARS - 16);
    format!("{prefix}/{}-{:04x}", std::process::id(), fastrand::u16(..))
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_identities_are_printable_bounded_and_per_process() {
        let a = super::process_identity("pod-1");
        assert!(
            a.starts_with(&format!("pod-1/{}-", std::process::id())),
            "{a}"
        );
        let long = super::process_identity(&format!("x\u{1b}[31m{}", "y".repeat(500)));
        assert!(
            long.chars().count() <= crate::text::MAX_IDENTITY_CHARS,
            "{long}"
        );
        assert!(!long.chars().any(char::is_control), "{long:?}");
    }
}
