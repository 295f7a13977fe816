//! Errors of the API crate.

/// Everything that can fail in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A generated CRD could not be rendered as YAML.
    #[error("rendering {file} as YAML")]
    Yaml {
        file: &'static str,
        #[source]
        source: serde_yaml::Error,
    },
    /// Writing a CRD file failed.
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// `crdgen` was asked for a CRD it does not know.
    #[error("unknown CRD {0:?}; known: dsrservice, dsrnodereport")]
    UnknownCrd(String),
}
