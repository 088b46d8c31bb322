//! An error and its causes as one line for people: each cause appended
//! once. Errors that quote their source in their own message (`cannot open
//! x: No such file or directory`) and also report it as their `source()`
//! would otherwise print it twice.

use std::error::Error;

/// `err` and each of its causes, joined with `: `, skipping a cause whose
/// text the line already holds.
pub fn error_text(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open model.bin: {source}")]
    struct Open {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error")]
    struct Connect {
        #[source]
        source: Inner,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error")]
    struct Inner {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let missing = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = Open { source: missing() };
        assert_eq!(
            error_text(&e),
            format!("cannot open model.bin: {}", missing())
        );
        let e = Connect {
            source: Inner {
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            },
        };
        assert_eq!(error_text(&e), "tcp connect error: connection refused");
        let e = anyhow::Error::new(Open { source: missing() }).context("saving o/m");
        assert_eq!(
            error_text(e.as_ref()),
            format!("saving o/m: cannot open model.bin: {}", missing())
        );
    }
}
