//! The README works verbatim: every command of `README.md` and
//! `device-sim/README.md` is run by a test (this one, and the README tests
//! of `example-kv` and `device-sim`, whose binaries their blocks use) or
//! checked statically — see `tests/support/readme.rs` for the markers and
//! the substitutions (free ports, the test's own binaries).

#[path = "support/readme.rs"]
mod readme;

/// Every sh block of both READMEs has a valid marker, each runner has its
/// test, and every command of a `static` block passes its static check.
#[test]
fn every_readme_command_is_run_or_checked() {
    let mut counts = std::collections::BTreeMap::new();
    for file in readme::READMES {
        for block in readme::blocks(file) {
            *counts.entry(block.runner.clone()).or_insert(0) += 1;
            if block.runner != "static" {
                continue;
            }
            let commands = block.commands();
            assert!(!commands.is_empty(), "{}: an empty block", block.at());
            for cmd in commands {
                if let Err(why) = readme::check_static(&cmd) {
                    panic!("{}: `{cmd}`: {why}", block.at());
                }
            }
        }
    }
    for runner in readme::RUNNERS {
        assert!(
            counts.contains_key(*runner),
            "no block for {runner}: {counts:?}"
        );
        let test = readme::root().join(runner).join("tests/readme.rs");
        assert!(test.is_file(), "{} runs no README blocks", test.display());
    }
}

/// The single gateway of "Run it" and its requests, and the three-gateway
/// group on loopback, grown by a fourth that takes the lead while the third
/// leaves — all as the README writes them.
#[test]
fn the_readme_gateway_commands_work() {
    let runner = readme::Runner::new(
        "README.md",
        "gateway",
        &[("gateway", env!("CARGO_BIN_EXE_gateway"))],
    );
    let out = runner.run();
    // What the requests answered: a device, a command, a batch, the API document,
    // the members, the transfer and the removal.
    for expected in [
        "\"id\":\"pump-7\"",
        "\"name\":\"reboot\"",
        "\"devices\":[{\"id\":\"pump-8\",\"secret\":",
        "{\"openapi\":",
        "{\"asyncapi\":\"3.0.0\"",
        "\"suffrage\":\"learner\"",
        "\"suffrage\":\"voter\"",
        "\"suffrage\":\"removed\"",
        // A device registered through the group that talks mutual TLS.
        "\"id\":\"valve-1\"",
    ] {
        assert!(out.contains(expected), "no {expected} in\n{out}");
    }
}
