//! Settings shared by the commands, resolved once: flag, else environment,
//! else default, the way ServerlessLLM resolves them.

use std::path::{Path, PathBuf};

/// Environment variable naming the storage path.
pub const STORAGE_PATH_ENV: &str = "STORAGE_PATH";

/// The storage path: the flag, else `$STORAGE_PATH`, else `~/models`, with a
/// leading `~` expanded as the reference CLI does.
pub fn resolve_storage_path(flag: Option<&Path>) -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let chosen = flag
        .map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(STORAGE_PATH_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("~/models"));
    expand_tilde(&chosen, home.as_deref())
}

/// The storage path of a client of a daemon that reported `daemon_says`
/// (its own, from `GetServerConfig`): the flag, else `$STORAGE_PATH`, else
/// the daemon's when that directory is here (the same host), else
/// `~/models`.
pub fn resolve_client_storage_path(flag: Option<&Path>, daemon_says: Option<&Path>) -> PathBuf {
    let env_set = std::env::var_os(STORAGE_PATH_ENV).is_some_and(|v| !v.is_empty());
    match daemon_says {
        Some(dir) if flag.is_none() && !env_set && dir.is_absolute() && dir.is_dir() => {
            dir.to_owned()
        }
        _ => resolve_storage_path(flag),
    }
}

/// Replaces a leading `~` component with `home`.
pub fn expand_tilde(path: &Path, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~"), home) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_a_leading_tilde_only() {
        let home = Some(Path::new("/home/u"));
        assert_eq!(
            expand_tilde(Path::new("~/models"), home),
            Path::new("/home/u/models")
        );
        assert_eq!(expand_tilde(Path::new("~"), home), Path::new("/home/u"));
        assert_eq!(expand_tilde(Path::new("/a/~"), home), Path::new("/a/~"));
        assert_eq!(expand_tilde(Path::new("~/m"), None), Path::new("~/m"));
    }
}
