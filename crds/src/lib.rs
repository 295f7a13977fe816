//! The `DsrService` API types. Still a stub: the API issue fills it.
