//! Test support: network namespaces as hosts.
