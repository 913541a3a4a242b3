//! Guardrails: rules that screen what callers send and what providers
//! answer, in the proxy, so nothing leaves the pod that policy forbids.
//! Everything here is pure; the pipeline's guard stage applies it.
//!
//! * `detect`: the detectors (personal data, secrets, keywords, regexes)
//!   and the prompt-injection screen.
//! * `external`: the protocol of a team's own classifier, asked over HTTP.
//! * `policy`: the `guardrails` section, compiled.
//! * `json_text`: the text values of a JSON body, and their rewrite.
//! * `screen`: a whole body screened with a caller's rules.
//! * `stream`: answers screened as they stream, in the caller's API.

pub mod detect;
pub mod external;
pub mod json_text;
pub mod policy;
pub mod screen;
pub mod stream;
