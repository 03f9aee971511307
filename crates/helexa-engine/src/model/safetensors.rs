//! Dense safetensors + `config.json` directories (the GPU path).

use std::path::Path;

/// Not available yet: reports what to use instead.
pub fn unsupported(path: &Path) -> String {
    format!(
        "{}: safetensors model directories are not supported yet; use a GGUF file",
        path.display()
    )
}
