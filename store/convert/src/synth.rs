//! Synthetic checkpoints: a Llama-shaped safetensors model of about a chosen
//! size, with deterministic pseudo-random weights and a real `config.json`,
//! for the demo and the benchmarks (no network, no Python).
//!
//! Files are streamed, so multi-GiB checkpoints need no more memory than one
//! buffer. The header is serialized by the `safetensors` crate itself.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct SynthSpec {
    /// Approximate total tensor bytes (at least one layer is generated).
    pub target_bytes: u64,
    /// Number of safetensors shards (1 = a single `model.safetensors`).
    pub shards: usize,
    /// Seed of the weights.
    pub seed: u64,
}

/// What was generated.
#[derive(Clone, Debug)]
pub struct SynthModel {
    pub dir: PathBuf,
    pub tensors: usize,
    pub tensor_bytes: u64,
    pub weight_files: Vec<PathBuf>,
}

struct Shape {
    hidden: u64,
    intermediate: u64,
    vocab: u64,
    layers: u64,
}

impl Shape {
    fn for_bytes(target: u64) -> Self {
        let (hidden, vocab) = match target {
            t if t < 256 << 20 => (256, 4096),
            t if t < 8 << 30 => (1024, 32000),
            _ => (4096, 32000),
        };
        let intermediate = hidden * 11 / 4;
        let per_layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden);
        let fixed = 2 * (2 * vocab * hidden + hidden);
        let layers = (target.saturating_sub(fixed) / per_layer).max(1);
        Self {
            hidden,
            intermediate,
            vocab,
            layers,
        }
    }

    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (
            self.hidden as usize,
            self.intermediate as usize,
            self.vocab as usize,
        );
        let mut out = vec![("model.embed_tokens.weight".to_owned(), vec![v, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.k_proj.weight", vec![h, h]),
                ("self_attn.v_proj.weight", vec![h, h]),
                ("self_attn.o_proj.weight", vec![h, h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
            ] {
                out.push((format!("{p}.{name}"), shape));
            }
        }
        out.push(("model.norm.weight".to_owned(), vec![h]));
        out.push(("lm_head.weight".to_owned(), vec![v, h]));
        out
    }

    fn config_json(&self) -> String {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.hidden / 64,
            "num_key_value_heads": self.hidden / 64,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
        })
        .to_string()
    }
}

/// Writes a synthetic checkpoint into `dir` (created if missing).
pub fn write_synthetic(dir: &Path, spec: &SynthSpec) -> io::Result<SynthModel> {
    std::fs::create_dir_all(dir)?;
    let shape = Shape::for_bytes(spec.target_bytes);
    let tensors = shape.tensors();
    let bytes_of = |s: &[usize]| 2 * s.iter().product::<usize>() as u64;
    let total: u64 = tensors.iter().map(|(_, s)| bytes_of(s)).sum();

    // Cut the tensor list into shards of about equal size.
    let shards = spec.shards.max(1);
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new(); shards];
    let mut acc = 0u64;
    for t in tensors {
        let len = bytes_of(&t.1);
        let middle = acc + len / 2;
        let g = ((middle * shards as u64) / total.max(1)).min(shards as u64 - 1) as usize;
        acc += len;
        groups[g].push(t);
    }
    groups.retain(|g| !g.is_empty());
    let count = groups.len();

    let mut rng = XorShift(spec.seed | 1);
    let mut weight_map = serde_json::Map::new();
    let mut weight_files = Vec::new();
    for (k, group) in groups.iter().enumerate() {
        let file_name = if count == 1 {
            "model.safetensors".to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", k + 1)
        };
        for (name, _) in group {
            weight_map.insert(name.clone(), file_name.clone().into());
        }
        let path = dir.join(&file_name);
        write_shard(&path, group, &mut rng)?;
        weight_files.push(path);
    }
    if count > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    }
    std::fs::write(dir.join("config.json"), shape.config_json())?;
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 32}"#,
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}"#,
    )?;
    Ok(SynthModel {
        dir: dir.to_owned(),
        tensors: groups.iter().map(Vec::len).sum(),
        tensor_bytes: total,
        weight_files,
    })
}

fn write_shard(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    rng: &mut XorShift,
) -> io::Result<()> {
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let len = 2 * shape.iter().product::<usize>();
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: Dtype::BF16,
                shape: shape.clone(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let metadata = Metadata::new(Some(metadata), infos).map_err(io::Error::other)?;
    let mut header = serde_json::to_vec(&metadata).map_err(io::Error::other)?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = offset;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// xorshift64*: fast, deterministic filler bytes.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let word = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_files_the_safetensors_crate_reads() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SynthSpec {
            target_bytes: 6 << 20,
            shards: 3,
            seed: 7,
        };
        let model = write_synthetic(dir.path(), &spec).unwrap();
        assert_eq!(model.weight_files.len(), 3);
        assert!(model.tensor_bytes >= 4 << 20);
        let mut seen = 0;
        for f in &model.weight_files {
            let bytes = std::fs::read(f).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            seen += st.len();
        }
        assert_eq!(seen, model.tensors);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], "llama");
    }
}
