//! Compile tests for `#[clouds::service]`: what must expand and compile, and what must fail with
//! a clear error on the right token. Refresh the expected output with `TRYBUILD=overwrite`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
