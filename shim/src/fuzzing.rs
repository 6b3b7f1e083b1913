//! Entry points for the fuzz targets in `fuzz/` that reach the shim (cargo fuzz, nightly), and the
//! replay of their corpora in `cargo test` (stable). None may panic.

use std::collections::HashMap;
use std::path::Path;

use crate::agent_client::parse_handshake_answer;
use crate::config::ShimConfig;

/// The shim's TOML configuration, then the sandbox annotations it is asked to apply: the input is
/// the TOML text, a NUL, then `key=value` lines.
pub fn config(input: &[u8]) {
    let (toml, annotations) = match input.iter().position(|b| *b == 0) {
        Some(nul) => (&input[..nul], &input[nul + 1..]),
        None => (input, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(toml) else { return };
    let Ok(config) = ShimConfig::parse(text, Path::new("fuzz.toml")) else { return };
    let annotations: HashMap<String, String> = String::from_utf8_lossy(annotations)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    let _ = config.sandbox_settings(&annotations);
}

/// The muxer's answer to the shim's `CONNECT` line: `OK <port>\n`.
pub fn handshake_answer(input: &[u8]) {
    let answer = String::from_utf8_lossy(input);
    if parse_handshake_answer(&answer).is_some() {
        assert!(answer.starts_with("OK ") && answer.ends_with('\n'));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ironclad_test_prereq::replay_fuzz_corpus as replay;

    #[test]
    fn the_config_corpus_replays() {
        replay("shim_config", config);
    }

    #[test]
    fn the_handshake_answer_corpus_replays() {
        replay("hybrid_vsock_answer", handshake_answer);
    }
}
