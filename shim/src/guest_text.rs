//! Text the guest wrote (console lines, agent error messages, the agent's version) reaches the
//! shim's log and the errors containerd shows. The guest is not trusted: its text is escaped, so a
//! newline or a quote cannot start a forged log record, and cut, so it cannot flood a log.

/// The most bytes of guest text one log line or error carries.
pub const MAX_LEN: usize = 4096;

/// `text` with newlines, quotes, backslashes and other control or invisible characters escaped as
/// Rust writes them (`\n`, `\"`, `\u{1b}`), cut to at most `max` bytes with a note of what was cut.
pub fn escape(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for (index, c) in text.char_indices() {
        let escaped = c.escape_debug().to_string();
        // Single quotes are harmless in logfmt and JSON; keep them readable.
        let escaped = if c == '\'' { "'".to_string() } else { escaped };
        if out.len() + escaped.len() > max {
            out.push_str(&format!("…({} more bytes)", text.len() - index));
            break;
        }
        out.push_str(&escaped);
    }
    out
}

/// [`escape`] with the usual limit.
pub fn clean(text: &str) -> String {
    escape(text, MAX_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_quotes_and_escapes_cannot_forge_a_record() {
        let forged = "oops\ntime=\"2026\" level=error msg=\"forged\"\r\x1b[2J";
        let cleaned = clean(forged);
        assert!(!cleaned.contains('\n') && !cleaned.contains('\r') && !cleaned.contains('\x1b'));
        assert_eq!(cleaned, r#"oops\ntime=\"2026\" level=error msg=\"forged\"\r\u{1b}[2J"#);
    }

    #[test]
    fn long_text_is_cut_with_a_note() {
        let long = "x".repeat(10_000);
        let cleaned = escape(&long, 100);
        assert!(cleaned.starts_with(&"x".repeat(100)));
        assert!(cleaned.ends_with("…(9900 more bytes)"), "{cleaned}");
        assert!(cleaned.len() < 130);
    }

    #[test]
    fn plain_text_is_left_alone() {
        assert_eq!(
            clean("ironclad-agent 0.1.0: container 'c1' not found"),
            "ironclad-agent 0.1.0: container 'c1' not found"
        );
    }
}
