//! Forge throughput: validate a task with 50 inputs and render its three phase scripts,
//! with the definitions compiled once (as the server caches them per version).
//!
//!     cargo bench --bench forge
//!
//! Criterion runs on one thread; `thrpt` is tasks per second. The bar (issue 3) is
//! 10,000 tasks/s.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hpcforge::forge::render::{CompiledApp, forge};
use hpcforge::forge::{ForgeRequest, local};
use hpcforge::model::{ApplicationSpec, ClusterName, TaskId, UserName};
use serde_json::{Value, json};

/// An application with 50 inputs of every type, each used by its scripts, and a task
/// that sets all of them (in the portal's list format).
fn fifty_inputs() -> (CompiledApp, Value) {
    let mut def = String::from("name = 'bench'\n[resources.default]\ncpus = 1\nwalltime = '01:00:00'\n");
    let mut script = String::from("#!/bin/bash\nset -euo pipefail\n");
    let mut task = Vec::new();
    for i in 0..50 {
        let name = format!("in_{i:02}");
        let (kind, extra, value) = match i % 10 {
            0..=3 => ("int", "min = 0\nmax = 1000000\n", json!(i * 1000)),
            4 | 5 => ("float", "min = 0.0\n", json!(i as f64 / 3.0)),
            6 => ("string", "pattern = '^[a-z0-9_]+$'\nmaxLength = 64\n", json!(format!("value_{i}"))),
            7 => ("string", "", json!(format!("free text {i} with 'quotes' and $(dollars)"))),
            8 => ("select", "choices = ['low', 'medium', 'high']\n", json!("medium")),
            _ => ("boolean", "", json!(i % 2 == 0)),
        };
        def.push_str(&format!("[[inputs]]\nname = '{name}'\ntype = '{kind}'\nrequired = true\n{extra}"));
        script.push_str(&format!("printf '%s\\n' {name}=@@ {name} @@\n"));
        task.push(
            json!({ "name": name, "type": kind, "value": value, "label": format!("Input {i}"), "editable": true }),
        );
    }
    script.push_str("echo done\n");
    let spec: ApplicationSpec = toml::from_str(&def).expect("bench definition");
    let files: BTreeMap<String, String> = [
        ("app_prolog", script.clone()),
        ("app_execute", script.clone()),
        ("app_epilog", script),
        ("cluster/local-slurm", "module load bench/1.0 2>/dev/null || true\nexport OMP_PROC_BIND=close\n".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    (CompiledApp::compile(spec, 1, &files).expect("compiles"), Value::Array(task))
}

fn bench(c: &mut Criterion) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cluster = local::cluster(repo, &ClusterName::parse("local-slurm").unwrap(), None).expect("cluster folder");
    let (app, task) = fifty_inputs();
    let user = UserName::parse("alice").unwrap();
    let req = ForgeRequest { task_id: TaskId::new(), user: &user, home: "/home/alice", workspace: None };

    // Sanity: the benchmarked work succeeds and produces three scripts.
    let inputs = app.validator.validate(&task, &cluster.spec).expect("valid task");
    assert_eq!(forge(&app, &cluster, &inputs, &req).expect("forges").scripts.len(), 3);

    let mut g = c.benchmark_group("forge");
    g.throughput(Throughput::Elements(1));
    g.bench_function("validate+render 3 phases, 50 inputs", |b| {
        b.iter(|| {
            let inputs = app.validator.validate(black_box(&task), &cluster.spec).unwrap();
            black_box(forge(&app, &cluster, &inputs, &req).unwrap())
        })
    });
    g.bench_function("validate only, 50 inputs", |b| {
        b.iter(|| black_box(app.validator.validate(black_box(&task), &cluster.spec).unwrap()))
    });
    g.bench_function("render only, 3 phases", |b| {
        b.iter(|| black_box(forge(&app, &cluster, black_box(&inputs), &req).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
