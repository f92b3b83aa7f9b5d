//! Text that a less trusted party wrote, made safe to show: consumer-written annotations
//! (`refreshed-by`, `reauthorization-reason`, the claim holder) and answers from an endpoint reach
//! status fields, Events, `kubectl get` columns and logs. Pure.
//!
//! Control characters (terminal escape sequences, injected newlines) and the Unicode
//! bidirectional overrides that make text display differently from what it is are removed, and
//! the length is capped, so nothing written into the Secret can repaint an operator's screen or
//! forge a line of output.

/// Longest identity shown (a claim holder, `refreshed-by`): `<pod name>/<pid>-<random>` fits
/// easily.
pub const MAX_IDENTITY_CHARS: usize = 128;
/// Longest free-text reason shown (a re-authorisation reason, a status message).
pub const MAX_REASON_CHARS: usize = 512;

/// `text` without control or bidi-override characters, cut to `max` characters (an ellipsis
/// marks a cut).
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    for (count, c) in text.chars().filter(|c| is_displayable(*c)).enumerate() {
        if count == max {
            out.pop();
            out.push('…');
            return out;
        }
        out.push(c);
    }
    out
}

fn is_displayable(c: char) -> bool {
    !c.is_control()
        && !matches!(c,
            // Bidi embeddings/overrides and isolates ("Trojan Source").
            '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
            // Line and paragraph separators.
            | '\u{2028}' | '\u{2029}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_newlines_are_removed() {
        assert_eq!(
            sanitize("\u{1b}[31mred\u{1b}[0m\nREADY True\r\tx\u{7}", 100),
            "[31mred[0mREADY Truex"
        );
        assert_eq!(sanitize("a\u{202E}b\u{2066}c\u{2028}d", 100), "abcd");
    }

    #[test]
    fn long_text_is_cut_with_a_mark() {
        assert_eq!(sanitize("abcdef", 4), "abc…");
        assert_eq!(sanitize("abcd", 4), "abcd");
        assert_eq!(sanitize("ééééé", 3).chars().count(), 3);
    }

    #[test]
    fn ordinary_text_is_unchanged() {
        let s = "controller/xero-operator-7c9f/12-ab3f: invalid_grant (token expired)";
        assert_eq!(sanitize(s, MAX_REASON_CHARS), s);
    }
}
