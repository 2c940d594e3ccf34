//! Builds `src/runtime/init.c`, the warm pool's init program, as a static
//! executable that the daemon embeds and copies into pool containers: it must
//! run in any image, `FROM scratch` included, so it links nothing dynamically.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = "src/runtime/init.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let binary = out.join("hyperfuncd-init");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&binary)
        .arg(source)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{cc} could not build {source} as a static executable ({s}); \
             it needs a C compiler and a static C library (Debian: gcc, libc6-dev)"
        ),
        Err(e) => {
            panic!("cannot run the C compiler {cc:?}: {e} (Debian: apt-get install gcc libc6-dev)")
        }
    }
}
