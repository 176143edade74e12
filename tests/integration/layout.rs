//! The house keeps its shape: the modules stand in the layers `src/lib.rs` lists, each
//! using only those below it (no import circles), and no file under `src/` grows past
//! ~600 lines without saying why at its top.

use std::collections::BTreeMap;
use std::path::Path;

use crate::helpers::repo;

/// The layers, from the ground up, as `src/lib.rs` lists them.
fn layers() -> Vec<String> {
    let lib = std::fs::read_to_string(repo().join("src/lib.rs")).unwrap();
    let layout = lib.split("# Layout").nth(1).expect("src/lib.rs has a Layout section");
    layout
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("//!"))
        .filter_map(|l| l.strip_prefix("//! - [`")?.split('`').next().map(str::to_owned))
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every file of `src/` with its top-level module (`src/mediator/ssh.rs` → `mediator`).
fn sources() -> Vec<(String, std::path::PathBuf)> {
    let src = repo().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&src).unwrap();
            let top = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
            (top, p)
        })
        .collect()
}

/// The crate modules `text` refers to (`crate::x`), comments aside.
fn uses(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            found.push(name);
        }
    }
    found
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let layers = layers();
    assert!(layers.len() >= 10, "the Layout list of src/lib.rs was not read: {layers:?}");
    let mut wrong = BTreeMap::new();
    for (top, path) in sources() {
        if top == "lib" || top == "main" {
            continue;
        }
        let Some(level) = layers.iter().position(|l| *l == top) else {
            panic!("src/{top} is not in the Layout list of src/lib.rs");
        };
        let text = std::fs::read_to_string(&path).unwrap();
        for used in uses(&text) {
            if let Some(other) = layers.iter().position(|l| *l == used)
                && other > level
            {
                wrong.entry(format!("{} uses {used}", path.display())).or_insert(());
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "a module reaches above its layer (an import circle in the making):\n{:#?}",
        wrong.keys()
    );
}

#[test]
fn no_source_file_is_over_600_lines_without_a_reason_at_its_top() {
    let mut long = Vec::new();
    for (_, path) in sources() {
        let text = std::fs::read_to_string(&path).unwrap();
        let lines = text.lines().count();
        let head: String = text.lines().take(30).collect::<Vec<_>>().join("\n");
        if lines > 650 && !head.contains("Why this file is long:") {
            long.push(format!("{} ({lines} lines)", path.display()));
        }
    }
    assert!(long.is_empty(), "split these, or say at the top why not (`Why this file is long:`): {long:#?}");
}

#[test]
fn the_fixtures_readme_lists_exactly_the_files_there_are() {
    for scheduler in ["slurm", "sge"] {
        let dir = repo().join("tests/fixtures").join(scheduler);
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        let listed: std::collections::BTreeSet<String> =
            readme.lines().filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_owned)).collect();
        let present: std::collections::BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "README.md")
            .collect();
        assert_eq!(listed, present, "tests/fixtures/{scheduler}/README.md and the folder disagree");
    }
}
