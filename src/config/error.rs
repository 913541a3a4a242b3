//! What a configuration error says: the field path it concerns and why.
//! A leaf: every section's compiler reports through it.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Reads a section (or an entry of one) with serde, its errors at `path`.
pub(crate) fn deserialize_at<T: for<'de> Deserialize<'de>>(
    path: &str,
    v: &Value,
) -> Result<T, ConfigError> {
    T::deserialize(v).map_err(|e| ConfigError::new(path, e.to_string()))
}
