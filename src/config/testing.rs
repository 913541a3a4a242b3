//! Configuration builders for native tests: one proxy environment with a
//! key for every variable the test documents name, and documents compiled
//! (or refused) against it.

use crate::config::{compile, Compiled, Config};

pub const OPENAI_KEY: &str = "sk-test-openai";
pub const AZURE_KEY: &str = "az-test-secret";
pub const GROQ_KEY: &str = "gsk-test-groq";
pub const ANTHROPIC_KEY: &str = "sk-ant-test";
pub const GEMINI_KEY: &str = "gem-key";
pub const AWS_ACCESS_KEY_ID: &str = "AKIDTEST";
pub const AWS_SECRET_ACCESS_KEY: &str = "aws-test-secret";

/// The proxy's environment in tests. `NOKEY_API_KEY` is never set and
/// `EMPTY` is blank: both stand for a key the operator forgot.
pub const TEST_ENV: &[(&str, &str)] = &[
    ("OPENAI_API_KEY", OPENAI_KEY),
    ("AZURE_KEY", AZURE_KEY),
    ("GROQ_API_KEY", GROQ_KEY),
    ("ANTHROPIC_API_KEY", ANTHROPIC_KEY),
    ("GEMINI_API_KEY", GEMINI_KEY),
    ("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID),
    ("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY),
    ("EMPTY", "  "),
];

/// Looks `var` up in `TEST_ENV`, as `compile` looks up the proxy's.
pub fn test_env(var: &str) -> Option<String> {
    TEST_ENV
        .iter()
        .find(|(name, _)| *name == var)
        .map(|(_, value)| value.to_string())
}

/// Compiles `doc` against `TEST_ENV`; the error as the text a user reads.
pub fn compile_doc(doc: &str) -> Result<Compiled, String> {
    compile(doc.as_bytes(), &test_env).map_err(|e| e.to_string())
}

/// A document that must compile (panics with the error otherwise).
pub fn compiled(doc: &str) -> Compiled {
    compile_doc(doc).unwrap_or_else(|e| panic!("bad test config: {e}\n{doc}"))
}

/// The configuration of a document that must compile.
pub fn config(doc: &str) -> Config {
    compiled(doc).config
}

/// The error of a document that must not compile.
pub fn compile_error(doc: &str) -> String {
    match compile_doc(doc) {
        Ok(_) => panic!("compiled, but should not have: {doc}"),
        Err(e) => e,
    }
}
