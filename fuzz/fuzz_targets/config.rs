//! `/etc/lichen/config.toml` as the agent reads it: parsed (`AgentConfig::from_toml`), finished
//! (host defaults and validation, `AgentConfig::finish`) and rendered back for `lichen check`
//! (`AgentConfig::to_toml`).
//!
//! Any text must end in a config or a `ConfigError`, never a panic. A config that was accepted must
//! render (not the "cannot render" comment), and the rendering must parse again; when no bootstrap
//! token is set (a set one is rendered as `<redacted>`), the rendering must also be accepted again
//! and render to the same text, so what `lichen check` prints is a config the agent would run with.
//! With `LICHEN_FUZZ_DEBUG=1` in the environment each outcome is printed.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lichen::config::{AgentConfig, TokenSetting};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/etc/lichen/config.toml");
    let parsed = AgentConfig::from_toml(text, path);
    let mut config = match parsed {
        Ok(c) => c,
        Err(e) => {
            debug(|| format!("refused: {e}"));
            assert!(!e.to_string().is_empty(), "a parse error says something");
            return;
        }
    };
    if let Err(e) = config.finish() {
        debug(|| format!("invalid: {e}"));
        assert!(!e.to_string().is_empty(), "a validation error says something");
        return;
    }
    let rendered = config.to_toml();
    debug(|| format!("accepted:\n{rendered}"));
    assert!(!rendered.starts_with("# cannot render config"), "an accepted config renders: {rendered}");
    let mut again = match AgentConfig::from_toml(&rendered, path) {
        Ok(c) => c,
        Err(e) => panic!("an accepted config renders to TOML that does not parse: {e}\n{rendered}"),
    };
    if config.join.token != TokenSetting::Unset {
        return;
    }
    if let Err(e) = again.finish() {
        panic!("an accepted config, rendered and read again, is refused: {e}\n{rendered}");
    }
    let twice = again.to_toml();
    assert_eq!(rendered, twice, "rendering an accepted config is not a fixed point");
});

/// Prints `what()` when `LICHEN_FUZZ_DEBUG` is set.
fn debug(what: impl FnOnce() -> String) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("LICHEN_FUZZ_DEBUG").is_some()) {
        eprintln!("{}", what());
    }
}
