//! Name and label syntax, as apimachinery's validation package checks it: DNS subdomains and
//! labels (RFC 1123, RFC 1035) and label keys and values. Used by selectors and by object
//! validation alike.

/// RFC 1123 subdomain: at most 253 characters, lowercase alphanumerics, '-' and '.', starting
/// and ending with an alphanumeric.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|label| is_label_chars(label, 63, false))
}

/// RFC 1123 label: at most 63 characters, lowercase alphanumerics and '-', alphanumeric ends.
pub fn is_dns1123_label(s: &str) -> bool {
    is_label_chars(s, 63, false)
}

/// RFC 1035 label: like an RFC 1123 label but starting with a letter (Service names).
pub fn is_dns1035_label(s: &str) -> bool {
    is_label_chars(s, 63, true)
}

fn is_label_chars(s: &str, max: usize, letter_first: bool) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && (if letter_first {
            b[0].is_ascii_lowercase()
        } else {
            b[0].is_ascii_alphanumeric()
        })
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters
/// of alphanumerics, '-', '_', '.', starting and ending with an alphanumeric.
pub fn is_valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if !is_dns1123_subdomain(p) {
            return false;
        }
    }
    !name.is_empty() && is_valid_label_value(name)
}

/// A label value: empty, or at most 63 characters of alphanumerics, '-', '_', '.', starting and
/// ending with an alphanumeric.
pub fn is_valid_label_value(value: &str) -> bool {
    if value.is_empty() {
        return true;
    }
    let b = value.as_bytes();
    value.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}
