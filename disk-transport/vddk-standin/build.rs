//! Compiles the C half of the stand-in: the variadic log shim and gcc's layout checks.

fn main() {
    println!("cargo:rerun-if-changed=src/shim.c");
    cc::Build::new()
        .file("src/shim.c")
        .warnings(true)
        .extra_warnings(true)
        .compile("vddk_standin_shim");
}
