//! The README's example device is `examples/smart_valve.rs` (which cargo
//! compiles with the tests): the README's copy must be that file, exactly.

use std::path::Path;

/// The ```` ```rust ```` block after `<!-- device-example: PATH -->` in `readme`.
fn block_after_marker(readme: &str, path: &str) -> Option<String> {
    let marker = format!("<!-- device-example: {path} -->");
    let rest = &readme[readme.find(&marker)? + marker.len()..];
    let rest = rest
        .trim_start_matches(['\r', '\n'])
        .strip_prefix("```rust\n")?;
    Some(rest[..rest.find("\n```")? + 1].to_string())
}

#[test]
fn the_readme_example_device_is_the_example_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let file = "device/examples/smart_valve.rs";
    let example = std::fs::read_to_string(root.join(file)).expect("example");
    let block = block_after_marker(&readme, file)
        .unwrap_or_else(|| panic!("README.md has no ```rust block after the {file} marker"));
    assert!(
        block == example,
        "README.md's example differs from {file}: copy the file into the README"
    );
}

#[test]
fn the_marker_finds_the_block() {
    let text = "x\n<!-- device-example: a.rs -->\n```rust\nfn main() {}\n```\n";
    assert_eq!(
        block_after_marker(text, "a.rs").as_deref(),
        Some("fn main() {}\n")
    );
    assert_eq!(block_after_marker(text, "b.rs"), None);
    assert_eq!(
        block_after_marker("<!-- device-example: a.rs -->\n```sh\n```\n", "a.rs"),
        None
    );
}
