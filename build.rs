//! Builds `src/runtime/init.c`, the warm pool's init program, as a static
//! executable that the daemon embeds and copies into warm containers: it must
//! run in any image, `FROM scratch` included, so it links nothing dynamically.
//!
//! musl (`musl-gcc`, Debian `musl-tools`) is preferred: a 30 KB binary under
//! the MIT licence. Without it, or when cross-compiling, the target's C
//! compiler (as the `cc` crate finds it: `CC`, `CC_<target>`) links the C
//! library statically (Debian `libc6-dev`, Fedora `glibc-static`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "src/runtime/init.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let binary = out.join("hyperfuncd-init");
    let native = env::var("TARGET").ok() == env::var("HOST").ok();
    if native && compile(Command::new("musl-gcc"), &binary) {
        return;
    }
    let compiler = cc::Build::new().get_compiler();
    if compile(compiler.to_command(), &binary) {
        println!(
            "cargo:warning=warm pool init linked statically against {:?}'s C library; \
             install musl-tools for a small MIT-licensed one",
            compiler.path()
        );
        return;
    }
    panic!(
        "cannot build {SOURCE} as a static executable: install musl-tools, or a C \
         compiler and a static C library (Debian: gcc libc6-dev; Fedora: gcc glibc-static)"
    );
}

/// Compiles the init with `cc`; false if the compiler is missing or fails.
fn compile(mut cc: Command, binary: &std::path::Path) -> bool {
    cc.args(["-static", "-Os", "-s", "-Wall", "-Wextra", "-o"])
        .arg(binary)
        .arg(SOURCE);
    matches!(cc.status(), Ok(s) if s.success())
}
