//! Text that a less trusted party wrote, made safe to show: consumer-written annotations
//! (`refreshed-by`, `reauthorization-reason`, the claim holder) and answers from an endpoint reach
//! status fields, Events, `kubectl get` columns and logs. Pure.
//!
//! Control characters (terminal escape sequences, injected newlines), every Unicode format
//! character (general category Cf: the bidirectional overrides and marks that make text display
//! differently from what it is, zero-width spaces and joiners, the byte-order mark, invisible
//! operators) and the line and paragraph separators are removed, and the length is capped, so
//! nothing written into the Secret can repaint an operator's screen, forge a line of output, or
//! hide text inside a name.

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
    use unicode_general_category::{GeneralCategory as G, get_general_category};
    !matches!(
        get_general_category(c),
        // Control (C0, C1), format (bidi embeddings, overrides, isolates and marks: "Trojan
        // Source"; zero-width characters; U+FEFF), line and paragraph separators.
        G::Control | G::Format | G::LineSeparator | G::ParagraphSeparator
    )
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
    fn invisible_format_characters_are_removed() {
        // Right-to-left and Arabic letter marks, zero-width space, joiner and non-joiner, word
        // joiner, the byte-order mark, an invisible operator, a tag character, the soft hyphen,
        // the paragraph separator: none of them shows, each can hide or reorder text.
        let hidden = "a\u{200F}b\u{061C}c\u{200B}d\u{200D}e\u{200C}f\u{2060}g\u{FEFF}h\u{2062}i\u{E0041}j\u{00AD}k\u{2029}l";
        assert_eq!(sanitize(hidden, 100), "abcdefghijkl");
        // Letters of other scripts and emoji stay.
        assert_eq!(sanitize("Zoë Ōtaki 東京 ✓", 100), "Zoë Ōtaki 東京 ✓");
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
