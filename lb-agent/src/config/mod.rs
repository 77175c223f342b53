//! Agent configuration: the typed model of the TOML file (`[agent]`, `[dataplane]`, `[security]`,
//! `[[service]]`), its defaults, reading, and validation.
//!
//! - [`model`]: one struct per table, one field per key, and the defaults. It is the
//!   single source of the keys: the reader, the REST API bodies and the defaults all
//!   follow from its serde implementations.
//! - [`read`]: TOML text to the model with every mistake reported at once (syntax,
//!   unknown key with a "did you mean" hint, wrong type, value out of range, missing
//!   key), each placed at its file, line and column.
//! - [`rules`]: what a model must satisfy beyond its types (ranges, names, the rules
//!   between keys), for a file, a model changed in code, or a service given through
//!   the API ([`validate_service`]).
//!
//! Each [`ConfigError`] carries the file, line, column, key path
//! (`service[0].backend[2].weight`) and the reason; `lb-agent check-config` prints
//! them one a line as `FILE:LINE:COL: KEY: WHY`.
//!
//! The REST API accepts a service as JSON exactly like a `[[service]]` table (same
//! field names, same defaults), and a backend like an entry of its `backend` list.
//!
//! From the former single `config.rs`: the model and its defaults are in `model.rs`
//! (`ServiceSpec`/`BackendSpec` are gone: `ServiceConfig`'s own `Deserialize` fills in
//! the scheduler and backend ports); the hand `Walker`, the `*_KEYS` lists,
//! `suggest` and `position` gave way to the generic reader in `read.rs`; the limits
//! (`MAX_WEIGHT` ...) and `check_*` functions are in `rules.rs`; the tests in `tests.rs`.

mod model;
mod read;
mod rules;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs;
use std::path::Path;

use toml::de::DeTable;

pub use model::*;
pub use rules::check_api_backend_tls;
pub use rules::{MAX_WEIGHT, check_api_tls, parse_prefix, validate_security, validate_service};

/// One problem found in a configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// File (or other origin) the error is in; empty for a service given through the API.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// Key path such as `service[0].backend[2].weight`; empty for syntax errors.
    pub key: String,
    /// What is wrong, and where useful, what to do.
    pub message: String,
}

impl ConfigError {
    /// An error with neither file nor position: a key path and a reason.
    pub fn at_key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: String::new(),
            line: None,
            column: None,
            key: key.into(),
            message: message.into(),
        }
    }
}

/// `FILE:LINE:COL: KEY: MESSAGE`, leaving out the parts that are unknown or empty.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut located = !self.file.is_empty();
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
            located = true;
        }
        if located {
            f.write_str(": ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration, in file order. Displays one line per error.
#[derive(Debug, thiserror::Error)]
#[error("{}", display_lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn display_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Read and validate; errors name the file.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or [`Config::parse`] rejects it.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: origin.clone(),
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read the configuration: {e}"),
            }])
        })?;
        Self::parse(&text, &origin)
    }

    /// Parse and validate text; `origin` is the name used in error messages.
    ///
    /// # Errors
    ///
    /// Every problem found: a TOML syntax error alone, or else all unknown keys,
    /// wrong types and rule violations, in file order.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let root = DeTable::parse(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| read::position(text, span.start))
                .unzip();
            ConfigErrors(vec![ConfigError {
                file: origin.to_owned(),
                line,
                column,
                key: String::new(),
                message: format!("TOML syntax error: {}", e.message().trim_end()),
            }])
        })?;

        let read = read::read::<Config>(&root, text, origin);
        let mut errors = read.errors.clone();
        if let Some(config) = &read.value {
            let (checkable, ids) =
                rules::checkable(config, &read.errors, |array| read.file_indices(array));
            for mut error in rules::validate_model(&checkable, &ids) {
                read.place(&mut error);
                errors.push(error);
            }
        }
        match read.value {
            Some(config) if errors.is_empty() => Ok(config),
            _ => {
                errors.sort_by_key(|e| (e.line.is_none(), e.line, e.column));
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Validate a model built in code or changed after loading (for example by
    /// command-line overrides). The errors carry key paths but no file or position.
    #[must_use]
    pub fn validate(&self) -> Vec<ConfigError> {
        rules::validate_config(self)
    }
}
