//! Make cargo rebuild the eBPF objects when bpf-linker changes (it is a "linker" cargo
//! does not track), as the aya template does.
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
