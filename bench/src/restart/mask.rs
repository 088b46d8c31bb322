//! Secrets kept out of the results. The commands, the recorded environment,
//! the benchmark's own command line and the quoted log lines are written
//! into files meant to be shared, so the values of variables named
//! `*_TOKEN`, `*_KEY`, `*_SECRET` or `*_PASSWORD` (`HF_TOKEN=hf_...`) and of
//! flags named alike (`--api-key xyz`, `--hf-token=...`) read `***` there.
//!
//! Two passes: one over the words of a command line (`NAME=value`,
//! `--flag value`, `--flag=value`), and one that replaces every value found
//! that way, or set in this process's environment under such a name,
//! wherever else it appears (a log line that echoes vLLM's arguments).

/// What a masked value reads as.
pub(super) const MASKED: &str = "***";

/// Values shorter than this are masked only where a name or flag marks
/// them, not wherever they appear (a value of `1` would mask every digit).
const MIN_LOOSE_LEN: usize = 4;

/// Is `name` an environment variable whose value is a secret?
pub(super) fn is_secret_var(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["_TOKEN", "_KEY", "_SECRET", "_PASSWORD"]
        .iter()
        .any(|s| upper.ends_with(s))
}

/// Is `flag` (with its leading dashes) one whose value is a secret, such as
/// `--api-key` or `--hf-token`?
fn is_secret_flag(flag: &str) -> bool {
    if !flag.starts_with('-') {
        return false;
    }
    let name = flag
        .trim_start_matches('-')
        .to_ascii_lowercase()
        .replace('_', "-");
    ["token", "key", "secret", "password"]
        .iter()
        .any(|s| name == *s || name.ends_with(&format!("-{s}")))
}

/// A valid shell variable name.
pub(super) fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The words of a shell command line as byte ranges: split at unquoted
/// whitespace, quotes and backslashes kept inside the word.
pub(super) fn word_spans(s: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match quote {
            Some(q) => {
                if c == q {
                    quote = None;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                }
            }
            None if c.is_whitespace() => {
                if let Some(b) = start.take() {
                    spans.push((b, i));
                }
            }
            None => {
                start.get_or_insert(i);
                match c {
                    '\'' | '"' => quote = Some(c),
                    '\\' => escaped = true,
                    _ => {}
                }
            }
        }
    }
    if let Some(b) = start {
        spans.push((b, s.len()));
    }
    spans
}

/// A word with one level of surrounding quotes removed.
pub(super) fn unquote(word: &str) -> &str {
    for q in ['\'', '"'] {
        if word.len() >= 2 && word.starts_with(q) && word.ends_with(q) {
            return &word[1..word.len() - 1];
        }
    }
    word
}

/// `text` with the values that names and flags mark as secret replaced by
/// [`MASKED`]; the values replaced are added to `found`.
fn mask_words(text: &str, found: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut value_next = false;
    for (start, end) in word_spans(text) {
        let word = &text[start..end];
        // Where in `text` the secret value is, if this word holds one.
        let value = if std::mem::take(&mut value_next) {
            Some(start)
        } else if let Some((name, _)) = word.split_once('=') {
            let bare = name.trim_start_matches(['\'', '"']);
            let secret = if bare.starts_with('-') {
                is_secret_flag(bare)
            } else {
                is_var_name(bare) && is_secret_var(bare)
            };
            secret.then_some(start + name.len() + 1)
        } else {
            value_next = is_secret_flag(word);
            None
        };
        if let Some(from) = value
            && from < end
        {
            found.push(unquote(&text[from..end]).to_owned());
            out.push_str(&text[copied..from]);
            out.push_str(MASKED);
            copied = end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The secrets of one benchmark run: what the commands mark as secret, and
/// the secret-named variables of this process's environment (which the
/// commands inherit).
#[derive(Debug, Default)]
pub(super) struct Secrets {
    values: Vec<String>,
}

impl Secrets {
    /// Collects the secrets of `commands`, the ones `given` otherwise (the
    /// benchmark's own `--api-key`) and those of this process's environment.
    pub(super) fn new(commands: &[&str], given: Option<&str>) -> Self {
        Self::from_parts(
            commands,
            given,
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// The same from `vars` instead of this process's environment.
    pub(super) fn from_parts(
        commands: &[&str],
        given: Option<&str>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let mut values: Vec<String> = given.into_iter().map(str::to_owned).collect();
        for c in commands {
            mask_words(c, &mut values);
        }
        values.extend(
            vars.into_iter()
                .filter(|(k, _)| is_secret_var(k))
                .map(|(_, v)| v),
        );
        values.retain(|v| v.len() >= MIN_LOOSE_LEN && v != MASKED);
        // Longest first, so that a value containing another is masked whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self { values }
    }

    /// `text` with every secret in it replaced by [`MASKED`].
    pub(super) fn mask(&self, text: &str) -> String {
        let mut out = mask_words(text, &mut Vec::new());
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASKED);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(commands: &[&str]) -> Secrets {
        Secrets::from_parts(
            commands,
            None,
            [("HF_TOKEN".to_owned(), "hf_fromtheshell".to_owned())],
        )
    }

    #[test]
    fn named_values_and_flags_are_masked() {
        let s = secrets(&[]);
        assert_eq!(
            s.mask("HF_TOKEN=hf_abc vllm serve org/name --api-key xyz --port 8000"),
            "HF_TOKEN=*** vllm serve org/name --api-key *** --port 8000"
        );
        assert_eq!(
            s.mask("OPENAI_API_KEY='a b c' AWS_SECRET=\"s\" x --hf-token=t1 --api_key=k"),
            "OPENAI_API_KEY=*** AWS_SECRET=*** x --hf-token=*** --api_key=***"
        );
        assert_eq!(
            s.mask("docker run -e HF_TOKEN=hf_abc -e HF_HUB_OFFLINE=1 img"),
            "docker run -e HF_TOKEN=*** -e HF_HUB_OFFLINE=1 img"
        );
    }

    #[test]
    fn other_words_are_left_alone() {
        let s = secrets(&[]);
        for text in [
            "vllm serve /models/org/name --load-format serverless_llm --tokenizer org/tok",
            "HF_HUB_OFFLINE=1 TOKENS=5 vllm serve x --served-model-name org/name",
            "--keyfile k --max-tokens 16",
        ] {
            assert_eq!(s.mask(text), text);
        }
    }

    #[test]
    fn values_found_once_are_masked_everywhere() {
        let s = secrets(&["HF_TOKEN=hf_abcdef vllm serve x --api-key s3cr3t"]);
        assert_eq!(
            s.mask("non-default args: {'api_key': ['s3cr3t'], 'token': 'hf_abcdef'}"),
            "non-default args: {'api_key': ['***'], 'token': '***'}"
        );
        assert_eq!(
            s.mask("logged in with hf_fromtheshell"),
            "logged in with ***"
        );
        // Short values are masked only where a name marks them.
        let short = secrets(&["X_KEY=ab y"]);
        assert_eq!(short.mask("ab X_KEY=ab"), "ab X_KEY=***");
    }

    #[test]
    fn words_split_at_unquoted_whitespace() {
        let s = "a 'b c' \"d \\\" e\" f\\ g";
        let words: Vec<&str> = word_spans(s).iter().map(|&(a, b)| &s[a..b]).collect();
        assert_eq!(words, ["a", "'b c'", "\"d \\\" e\"", "f\\ g"]);
    }
}
