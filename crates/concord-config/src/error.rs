use std::path::PathBuf;

/// Why a configuration was refused. Every variant names the file; the ones about content also
/// name the key (a dotted path such as `servers.github.env.TOKEN`) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {location}syntax error: {message}")]
    Syntax {
        file: PathBuf,
        location: String,
        message: String,
    },
    #[error("{file}: key `{key}`: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        file: &std::path::Path,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key the error is about, when it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}
