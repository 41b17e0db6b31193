//! The README's three-node example group, run as written (with free ports
//! and this crate's `entente-kv`); see `gateway/tests/support/readme.rs`.

#[path = "../../gateway/tests/support/readme.rs"]
mod readme;

#[test]
fn the_readme_example_group_commands_work() {
    let runner = readme::Runner::new(
        "README.md",
        "example-kv",
        &[("entente-kv", env!("CARGO_BIN_EXE_entente-kv"))],
    );
    let out = runner.run();
    assert!(
        out.lines().any(|l| l.starts_with("OK ")),
        "the write was not acknowledged:\n{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("VALUE ") && l.ends_with(" hello")),
        "the read did not return the write:\n{out}"
    );
}
