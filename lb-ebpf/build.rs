//! Rebuild when bpf-linker changes: it is an undeclared tool dependency of this crate
//! (artifact dependencies would express it, but they are unstable).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
