//! Compiles the C half of the stand-in (the variadic log shim and gcc's layout checks) and
//! selects the minimal variant.
//!
//! `VDDK_STANDIN_MINIMAL=1` builds a library exporting only what every supported VDDK (6.5)
//! has: no AllocateConnectParams, QueryAllocatedBlocks/FreeBlockList, ReadAsync/WriteAsync/Wait,
//! PrepareForAccess/EndAccess, Cleanup or metadata functions — to test the loader's fallbacks.
//! An environment variable rather than a cargo feature, so `--all-features` never builds it
//! into the target directory the full stand-in lives in (a cdylib's file name carries no hash).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(standin_minimal)");
    println!("cargo:rerun-if-env-changed=VDDK_STANDIN_MINIMAL");
    if std::env::var_os("VDDK_STANDIN_MINIMAL").is_some_and(|v| v == "1") {
        println!("cargo:rustc-cfg=standin_minimal");
    }
    println!("cargo:rerun-if-changed=src/shim.c");
    cc::Build::new()
        .file("src/shim.c")
        .warnings(true)
        .extra_warnings(true)
        .compile("vddk_standin_shim");
}
