//! What was timed, said in the report: whether each side started with the
//! Hugging Face Hub switched off (read the way the doctor reads it, from
//! the environment the command gets), and the doctor's findings that
//! qualify the figures (a snapshot missing, storage on the OS disk, a stale
//! conversion).

use std::ffi::OsString;

use sllm_doctor::{hf, model as doctor_model, storage};

use super::*;

/// Commands that run the server somewhere the benchmark's environment does
/// not reach.
const CONTAINER_TOOLS: [&str; 5] = ["docker", "podman", "nerdctl", "docker-compose", "kubectl"];

/// The variables that switch the Hub off.
const OFFLINE_VARS: [&str; 2] = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"];

/// Whether a side ran offline, as far as the benchmark can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Offline {
    Yes,
    No,
    /// Set where the benchmark cannot see (inside a container, or by the
    /// command in a way it does not read).
    Unknown,
    /// One side yes, the other no.
    Mixed,
}

impl Offline {
    pub(super) fn label(self) -> &'static str {
        match self {
            Offline::Yes => "yes",
            Offline::No => "no",
            Offline::Unknown => "unknown",
            Offline::Mixed => "mixed",
        }
    }
}

/// One side's offline mode and how it was decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(super) struct SideOffline {
    pub(super) mode: Offline,
    pub(super) why: String,
}

/// Both sides' offline modes.
#[derive(Clone, Debug, Serialize)]
pub(super) struct OfflineSides {
    pub(super) baseline: SideOffline,
    pub(super) faststart: SideOffline,
}

impl OfflineSides {
    /// Both sides' modes as one: theirs when they agree.
    pub(super) fn mode(&self) -> Offline {
        match (self.baseline.mode, self.faststart.mode) {
            (a, b) if a == b => a,
            (Offline::Unknown, _) | (_, Offline::Unknown) => Offline::Unknown,
            _ => Offline::Mixed,
        }
    }

    /// `yes (why)`, or each side's when they differ.
    pub(super) fn describe(&self) -> String {
        let (b, f) = (&self.baseline, &self.faststart);
        if b == f {
            return format!("{}: {}", b.mode.label(), b.why);
        }
        format!(
            "{}: baseline {}: {}; fast start {}: {}",
            self.mode().label(),
            b.mode.label(),
            b.why,
            f.mode.label(),
            f.why
        )
    }
}

/// The offline mode of a side that runs `command` (with `sh -c`), given
/// the variables sllm-bench passes (`--offline` sets both offline
/// variables) over the shell's (`var`).
pub(super) fn side_offline(
    side: Side,
    command: &str,
    offline_flag: bool,
    var: impl Fn(&str) -> Option<OsString>,
) -> SideOffline {
    let words: Vec<&str> = mask::word_spans(command)
        .into_iter()
        .map(|(a, b)| mask::unquote(&command[a..b]))
        .collect();
    let tool = words.iter().find_map(|w| {
        let base = w.rsplit('/').next().unwrap_or(w);
        CONTAINER_TOOLS.iter().find(|t| **t == base)
    });
    if let Some(tool) = tool {
        return SideOffline {
            mode: Offline::Unknown,
            why: format!(
                "set inside the container: the {} runs `{tool}`, and HF_HUB_OFFLINE and \
                 TRANSFORMERS_OFFLINE reach a container only through `-e` (compose: \
                 `environment:`), which the benchmark does not read",
                side.label()
            ),
        };
    }
    // `NAME=value` words before the program (after an optional `exec` or
    // `env`) are the command's own environment.
    let mut own: Vec<(&str, &str)> = Vec::new();
    let mut rest = words.as_slice();
    while let Some((first, tail)) = rest.split_first() {
        match first.split_once('=') {
            Some((name, value)) if mask::is_var_name(name) => own.push((name, value)),
            _ if *first == "exec" || *first == "env" => {}
            _ => break,
        }
        rest = tail;
    }
    // Reading the variables (`test "$HF_HUB_OFFLINE" = 1`) is fine;
    // setting or unsetting them past the program name is not read.
    let sets = |pair: &[&str]| {
        OFFLINE_VARS.iter().any(|v| {
            pair[1].contains(&format!("{v}="))
                || (pair[1].trim_end_matches([';', '&', '|', ')']) == *v
                    && matches!(pair[0], "unset" | "export" | "-u" | "--unset"))
        })
    };
    let mut padded = vec![""];
    padded.extend(rest);
    if padded.windows(2).any(sets) {
        return SideOffline {
            mode: Offline::Unknown,
            why: format!(
                "the {} command sets HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE itself, past where \
                 the benchmark reads it (only `NAME=value` before the program is read)",
                side.label()
            ),
        };
    }
    // Each variable as the command gets it, and from where: its own
    // prefix wins over --offline, which wins over the shell.
    let lookup = |name: &str| -> Option<(OsString, &'static str)> {
        if let Some((_, v)) = own.iter().rev().find(|(n, _)| *n == name) {
            return Some((OsString::from(v), "set by the command"));
        }
        if offline_flag && OFFLINE_VARS.contains(&name) {
            return Some((OsString::from("1"), "from --offline"));
        }
        var(name).map(|v| (v, "from the shell"))
    };
    let env = HfEnv::from_vars(|name| lookup(name).map(|(v, _)| v));
    // Who decided, as `HfEnv::is_offline` reads it: HF_HUB_OFFLINE when set
    // and not empty, else TRANSFORMERS_OFFLINE.
    let set = |name: &str| {
        lookup(name)
            .filter(|(v, _)| !v.is_empty())
            .map(|(v, from)| format!("{name}={} ({from})", v.to_string_lossy()))
    };
    let decided = set("HF_HUB_OFFLINE").or_else(|| set("TRANSFORMERS_OFFLINE"));
    if env.is_offline() {
        SideOffline {
            mode: Offline::Yes,
            why: decided.unwrap_or_default(),
        }
    } else {
        SideOffline {
            mode: Offline::No,
            why: match decided {
                Some(d) => format!("{d}: online, vLLM may download what the cache lacks"),
                None => "HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE unset: online, vLLM may \
                         download what the cache lacks"
                    .to_owned(),
            },
        }
    }
}

/// A doctor's finding that qualifies what was timed.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Caveat {
    /// What it means for the figures.
    pub(super) meaning: String,
    #[serde(flatten)]
    pub(super) check: Check,
}

/// What a finding means for the figures; None for findings that do not
/// touch them.
fn meaning(check: &Check) -> Option<String> {
    let s = match check.name {
        "hf.snapshot" | "hf.files" => {
            "the baseline may have timed a download: vLLM fetches what the Hugging Face cache \
             lacks while it starts"
        }
        "hf.device" => {
            "the two sides read from different drives: the comparison is also one of drives"
        }
        "storage.device" | "model.device" if check.status == Status::Stop => {
            "the fast start read the converted model from the OS disk (or through a link the \
             daemon refuses): its reads shared the system's disk"
        }
        "storage.device" | "model.device" => {
            "the fast start read the converted model from this drive, not a dedicated local \
             NVMe drive: its cold reads ran at this drive's speed"
        }
        "storage.direct_io" => {
            "the daemon could not read with O_DIRECT there: its reads went through the page \
             cache, so a start may have been warmer than it looks"
        }
        "model.source" => {
            "stale conversion: the fast start loaded weights converted from another commit than \
             the snapshot the baseline loads"
        }
        "model.converted" => {
            "the storage path holds no converted copy of the model: the fast start loaded \
             something else, or from somewhere else"
        }
        _ => return None,
    };
    Some(s.to_owned())
}

/// The doctor's findings about `model` that qualify the figures, judged
/// with the Hugging Face settings `hf` (those the commands get). Findings
/// named in `already` (the offline checks, shown apart) are left out.
pub(super) fn caveats(
    hf_env: &HfEnv,
    storage_path: &Path,
    model: &str,
    revision: &str,
    already: &[Check],
) -> Vec<Caveat> {
    let found = hf::find(hf_env, model, revision);
    let mut checks = storage::checks(storage_path, None);
    checks.extend(hf::snapshot_checks(hf_env, model, revision, &found));
    let cached = found.as_ref().ok();
    checks.extend(cached.and_then(|c| hf::device_check(c, storage_path)));
    checks.extend(doctor_model::checks(
        storage_path,
        model,
        revision,
        cached,
        doctor_model::Purpose::Doctor { quick: true },
    ));
    let mut out: Vec<Caveat> = Vec::new();
    for check in checks {
        if check.status == Status::Pass || already.iter().any(|a| a.name == check.name) {
            continue;
        }
        // One line per meaning: the model's folder on the OS disk is the
        // storage path on the OS disk.
        if let Some(meaning) = meaning(&check)
            && !out.iter().any(|c| c.meaning == meaning)
        {
            out.push(Caveat { meaning, check });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |n| {
            pairs
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn offline_is_read_like_the_doctor_reads_it() {
        let side = |cmd: &str, flag: bool, env: &[(&str, &str)]| {
            side_offline(Side::Baseline, cmd, flag, vars(env))
        };
        let plain = "vllm serve org/name";
        assert_eq!(side(plain, false, &[]).mode, Offline::No);
        let shell = side(plain, false, &[("HF_HUB_OFFLINE", "1")]);
        assert_eq!(shell.mode, Offline::Yes);
        assert!(
            shell.why.contains("HF_HUB_OFFLINE=1 (from the shell)"),
            "{shell:?}"
        );
        assert_eq!(
            side(plain, false, &[("TRANSFORMERS_OFFLINE", "yes")]).mode,
            Offline::Yes
        );
        assert_eq!(
            side(plain, false, &[("HF_HUB_OFFLINE", "0")]).mode,
            Offline::No
        );
        let flag = side(plain, true, &[("HF_HUB_OFFLINE", "0")]);
        assert_eq!(flag.mode, Offline::Yes);
        assert_eq!(flag.why, "HF_HUB_OFFLINE=1 (from --offline)");
        let own = side("HF_HUB_OFFLINE=0 exec vllm serve x", true, &[]);
        assert_eq!(own.mode, Offline::No, "the command's own setting wins");
        assert_eq!(
            side("env HF_HUB_OFFLINE=1 vllm serve x", false, &[]).mode,
            Offline::Yes
        );
        assert_eq!(
            side("export HF_HUB_OFFLINE=1; vllm serve x", false, &[]).mode,
            Offline::Unknown
        );
        assert_eq!(
            side(
                "unset HF_HUB_OFFLINE; vllm serve x",
                false,
                &[("HF_HUB_OFFLINE", "1")]
            )
            .mode,
            Offline::Unknown
        );
        let reads = "test \"$HF_HUB_OFFLINE\" = 1 && exec vllm serve x";
        assert_eq!(side(reads, true, &[]).mode, Offline::Yes);
    }

    #[test]
    fn a_container_is_unknown_whatever_the_shell_says() {
        for cmd in [
            "docker run --rm -e HF_HUB_OFFLINE=1 vllm/vllm-openai --model org/name",
            "cd /srv && /usr/bin/podman run img",
            "docker compose up vllm",
        ] {
            let s = side_offline(Side::Faststart, cmd, true, vars(&[("HF_HUB_OFFLINE", "1")]));
            assert_eq!(s.mode, Offline::Unknown, "{cmd}");
            assert!(s.why.starts_with("set inside the container"), "{s:?}");
        }
    }

    #[test]
    fn both_sides_are_one_mode_when_they_agree() {
        let yes = SideOffline {
            mode: Offline::Yes,
            why: "HF_HUB_OFFLINE=1 (from --offline)".into(),
        };
        let no = SideOffline {
            mode: Offline::No,
            why: "unset".into(),
        };
        let both = OfflineSides {
            baseline: yes.clone(),
            faststart: yes.clone(),
        };
        assert_eq!(both.mode(), Offline::Yes);
        assert_eq!(both.describe(), "yes: HF_HUB_OFFLINE=1 (from --offline)");
        let mixed = OfflineSides {
            baseline: no,
            faststart: yes,
        };
        assert_eq!(mixed.mode(), Offline::Mixed);
        assert!(mixed.describe().starts_with("mixed: baseline no"));
    }

    #[test]
    fn only_findings_about_the_timing_become_caveats() {
        let stale = Check::warn("model.source", "converted from a", "re-convert");
        assert!(meaning(&stale).unwrap().starts_with("stale conversion"));
        let missing = Check::warn("hf.snapshot", "not in the cache", "download it");
        assert!(
            meaning(&missing)
                .unwrap()
                .contains("may have timed a download")
        );
        let os_disk = Check::stop("storage.device", "the OS disk", "mount the NVMe");
        assert!(meaning(&os_disk).unwrap().contains("OS disk"));
        assert!(meaning(&Check::warn("hf.pinned", "main moves", "pin")).is_none());
    }
}
