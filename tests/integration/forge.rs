//! The forge: golden scripts for the examples, a corpus of hostile values run for
//! real, upload-time refusals, previews over HTTP and the CLI, and forged scripts
//! accepted and run by the test environment's Slurm.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hpcforge::definitions::{self, UploadLimits, folder};
use hpcforge::forge::render::{CompiledApp, CompiledCluster, forge};
use hpcforge::forge::{ForgeRequest, local};
use hpcforge::model::{AppName, ApplicationSpec, ClusterName, ClusterSpec, Phase, TaskId, UserName};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestStore, repo, spawn_app};

/// A fixed task, so golden files are stable.
const GOLDEN_TASK: &str = "0193f2a4-5b6c-7d8e-9f01-23456789abcd";

fn alice() -> UserName {
    UserName::parse("alice").unwrap()
}

fn bash_n(text: &str) -> Result<(), String> {
    let out = Command::new("bash").arg("-n").arg("/dev/stdin").stdin(std::process::Stdio::piped()).output_with(text);
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

trait OutputWith {
    fn output_with(&mut self, stdin: &str) -> std::process::Output;
}

impl OutputWith for Command {
    fn output_with(&mut self, stdin: &str) -> std::process::Output {
        use std::io::Write as _;
        let mut child = self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let mut sin = child.stdin.take().unwrap();
        let data = stdin.to_owned();
        let writer = std::thread::spawn(move || {
            let _ = sin.write_all(data.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }
}

/// The examples forged from the repository folders, compared with `tests/golden/`.
/// `HPCFORGE_BLESS=1` rewrites the golden files after an intended change.
#[test]
fn the_example_applications_forge_exactly_their_golden_scripts() {
    let cluster = local::cluster(repo(), &ClusterName::parse("local-slurm").unwrap(), None).unwrap();
    let bless = std::env::var_os("HPCFORGE_BLESS").is_some();
    let cases: [(&str, Value); 3] = [
        ("sleep", json!([{ "name": "sleep", "type": "int", "value": 30 }])),
        ("pi", json!({ "samples": "20000", "result_file": "estimate.json", "method": "antithetic" })),
        ("workflow", json!({ "points": 5000, "bins": 12 })),
    ];
    let mut mismatches = Vec::new();
    for (app_name, inputs) in cases {
        let app = local::application(repo(), &AppName::parse(app_name).unwrap()).unwrap();
        let validated = app.validator.validate(&inputs, &cluster.spec).unwrap();
        let req = ForgeRequest {
            task_id: TaskId::parse(GOLDEN_TASK).unwrap(),
            user: &alice(),
            home: "/home/alice",
            workspace: None,
        };
        let forged = forge(&app, &cluster, &validated, &req).unwrap();
        for s in &forged.scripts {
            bash_n(&s.text).unwrap_or_else(|e| panic!("{app_name} {}: bash -n: {e}", s.phase));
            assert!(s.text.starts_with("#!/bin/bash\n") && s.text.ends_with('\n') && !s.text.contains('\r'));
            let golden = repo().join(format!("tests/golden/{app_name}-local-slurm/script_{}", s.phase));
            if bless {
                std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
                std::fs::write(&golden, &s.text).unwrap();
            } else {
                let want = std::fs::read_to_string(&golden)
                    .unwrap_or_else(|e| panic!("{}: {e} (run with HPCFORGE_BLESS=1)", golden.display()));
                if want != s.text {
                    mismatches.push(golden.display().to_string());
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "forged scripts differ from {mismatches:?}; review, then re-run with HPCFORGE_BLESS=1"
    );
}

// ---------------------------------------------------------------------------
// The hostile corpus
// ---------------------------------------------------------------------------

/// An application whose scripts put one string input everywhere the upload checks
/// allow, and record what they received; and a bare local cluster.
fn hostile_definitions(run_base: &Path) -> (CompiledApp, CompiledCluster) {
    let spec: ApplicationSpec = toml::from_str(
        r#"
        name = "hostile"
        [[inputs]]
        name = "v"
        type = "string"
        maxLength = 2000000
        [[inputs]]
        name = "n"
        type = "int"
        value = 3
        "#,
    )
    .unwrap();
    let mut files = BTreeMap::new();
    files.insert("app_prolog".to_owned(), "#!/bin/bash\nprintf '%s' @@ v @@ > prolog.out\n".to_owned());
    files.insert(
        "app_execute".to_owned(),
        r#"#!/bin/bash
set -u
x=@@ v @@
printf '%s' "$x" > assign.out
printf '%s' @@ v @@ > arg.out
arr=(@@ v @@ @@ v @@)
printf '%s' "${#arr[@]}" > array.out
[[ @@ v @@ == "$x" ]] && printf ok > test.out
case @@ v @@ in *) printf '%s' @@ v @@ > case.out ;; esac
y=$(printf '%s' @@ v @@)
printf '%s' "$y" > subst.out
echo "count: @@ n @@" > number.out
if [ -n "${HPCG_INPUT_v_FILE-}" ]; then cat "$HPCG_INPUT_v_FILE" > env.out; else printf '%s' "$HPCG_INPUT_v" > env.out; fi
"#
        .to_owned(),
    );
    files.insert(
        "app_epilog".to_owned(),
        "#!/usr/bin/env python3\nimport os\nv = os.environ.get('HPCG_INPUT_v')\nif v is None:\n    v = open(os.environ['HPCG_INPUT_v_FILE']).read()\nopen('python.out', 'w').write(v)\n".to_owned(),
    );
    files.insert(
        "cluster/here".to_owned(),
        "export FROM_ENV=@@ v @@\nprintf '%s' \"$FROM_ENV\" > env_script.out\n".to_owned(),
    );
    // The uploads checks accept these scripts.
    let upload = definitions::Upload { definition: spec.clone(), files: files.clone() };
    definitions::check_application(upload, &UploadLimits::default()).expect("the hostile app passes the upload checks");
    let app = CompiledApp::compile(spec, 1, &files).unwrap();
    let cluster_spec: ClusterSpec =
        toml::from_str(&format!("name = 'here'\nscheduler = 'local'\nrun_dir_base = '{}'", run_base.display()))
            .unwrap();
    let cluster = CompiledCluster::compile(
        cluster_spec,
        1,
        &BTreeMap::from([("forge/script_common".to_owned(), "#!/bin/bash\n@@ HPCG_PAYLOAD @@\n".to_owned())]),
    )
    .unwrap();
    (app, cluster)
}

/// Values that try to break out of quoting, a here-document, or the template. Each
/// `CANARY` becomes the path of a file the test checks is never created.
pub(crate) fn corpus(canary: &Path) -> Vec<String> {
    [
        "'",
        "\"",
        "\\",
        "''",
        "'\\''",
        "a'b\"c",
        "$(touch CANARY)",
        "`touch CANARY`",
        "; touch CANARY",
        "&& touch CANARY",
        "|| touch CANARY",
        "| touch CANARY",
        "'; touch CANARY; '",
        "\"; touch CANARY; \"",
        "$((1+1))$(touch CANARY)",
        "${IFS}touch${IFS}CANARY",
        "$'\\x24(touch CANARY)'",
        "<(touch CANARY)",
        ">(touch CANARY)",
        "x --wrap=touch CANARY",
        "x\\n#SBATCH --wrap=touch CANARY",
        "*",
        "~",
        "~root",
        "!!",
        "$HOME",
        "%x-%j",
        "{{x}}",
        "{% x %}",
        "@@ HPCG_TASK_ID @@",
        "@% if true %@touch CANARY@% endif %@",
        "HPCFORGE_APP_0000000000000000",
        "EOF",
        "＄(touch CANARY)",
        "；touch CANARY",
        "‵touch CANARY‵",
        "\u{202e}touch CANARY",
        "a\u{2028}b",
        "naïve café 日本語 🚀",
        "",
        " leading and trailing spaces ",
    ]
    .iter()
    .map(|t| t.replace("CANARY", &canary.display().to_string()))
    .collect()
}

#[test]
fn hostile_values_render_to_valid_scripts_that_never_run_them_and_arrive_intact() {
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("CANARY");
    let (app, cluster) = hostile_definitions(&work.path().join("runs"));
    for (i, value) in corpus(&canary).into_iter().enumerate() {
        let shown = format!("corpus #{i} ({} bytes)", value.len());
        let inputs =
            app.validator.validate(&json!({ "v": value }), &cluster.spec).unwrap_or_else(|p| panic!("{shown}: {p}"));
        let req = ForgeRequest { task_id: TaskId::new(), user: &alice(), home: "/nonexistent", workspace: None };
        let forged = forge(&app, &cluster, &inputs, &req).unwrap_or_else(|p| panic!("{shown}: {p}"));
        let run_dir = PathBuf::from(&forged.run_dir);
        for s in &forged.scripts {
            bash_n(&s.text).unwrap_or_else(|e| panic!("{shown}, {}: bash -n: {e}", s.phase));
            let out = Command::new("bash").arg("/dev/stdin").stdin(std::process::Stdio::piped()).output_with(&s.text);
            assert!(out.status.success(), "{shown}, {}: {}", s.phase, String::from_utf8_lossy(&out.stderr));
            assert!(!canary.exists(), "{shown}, {}: the injected command ran", s.phase);
        }
        // Every way the value reached the scripts carried it unchanged.
        for f in
            ["prolog.out", "assign.out", "arg.out", "case.out", "subst.out", "env.out", "python.out", "env_script.out"]
        {
            let got = std::fs::read_to_string(run_dir.join(f)).unwrap_or_else(|e| panic!("{shown}: {f}: {e}"));
            assert!(got == value, "{shown}: {f} differs");
        }
        assert_eq!(std::fs::read_to_string(run_dir.join("array.out")).unwrap(), "2", "{shown}: one word each");
        assert_eq!(std::fs::read_to_string(run_dir.join("test.out")).unwrap(), "ok", "{shown}");
        assert_eq!(std::fs::read_to_string(run_dir.join("number.out")).unwrap(), "count: 3\n");
        std::fs::remove_dir_all(&run_dir).unwrap();
    }
}

#[test]
fn values_that_cannot_be_carried_safely_are_refused_by_rule() {
    let work = tempfile::tempdir().unwrap();
    let (app, cluster) = hostile_definitions(work.path());
    for (value, rule) in [
        ("line\nbreak; touch /tmp/x", "control-character"),
        ("cr\rhere", "control-character"),
        ("nul\u{0}here", "control-character"),
        ("tab\there", "control-character"),
        ("\u{1b}[31mred", "control-character"),
        ("-rf", "leading-dash"),
        ("--wrap=touch /tmp/x", "leading-dash"),
        ("--checkpoint-action=exec=sh", "leading-dash"),
    ] {
        let p = app.validator.validate(&json!({ "v": value }), &cluster.spec).unwrap_err();
        let got: Vec<_> = p.iter().map(|x| x.rule.clone().unwrap_or_default()).collect();
        assert_eq!(got, [rule], "{value:?}");
        assert!(!p.to_string().contains(value), "the value is not echoed");
    }
    let too_long = "x".repeat(2_000_001);
    let p = app.validator.validate(&json!({ "v": too_long }), &cluster.spec).unwrap_err();
    assert_eq!(p.iter().next().unwrap().rule.as_deref(), Some("maxLength"));
}

/// A megabyte of injection attempts travels through markup and the environment
/// (written to a file: Linux caps one environment string at 128 KiB).
#[test]
fn a_one_megabyte_value_is_carried_intact_and_never_run() {
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("CANARY");
    let spec: ApplicationSpec = toml::from_str("name='big'\n[[inputs]]\nname='v'\ntype='string'\n").unwrap();
    let files = BTreeMap::from([
        ("app_prolog".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
        (
            "app_execute".to_owned(),
            "#!/bin/bash\nprintf '%s' @@ v @@ > markup.out\ncat \"$HPCG_INPUT_v_FILE\" > env.out\n".to_owned(),
        ),
        ("app_epilog".to_owned(), "#!/bin/sh\ntrue\n".to_owned()),
        ("cluster/here".to_owned(), "\n".to_owned()),
    ]);
    let app = CompiledApp::compile(spec, 1, &files).unwrap();
    let (_, cluster) = hostile_definitions(&work.path().join("runs"));
    let unit = format!("$(touch {})'\"`;", canary.display());
    let mut value = unit.repeat((1 << 20) / unit.len() + 1);
    value.truncate(1 << 20); // 1 MiB: the default cap of a string input, exactly
    assert_eq!(value.chars().count(), 1 << 20);
    let inputs = app.validator.validate(&json!({ "v": value }), &cluster.spec).unwrap();
    let req = ForgeRequest { task_id: TaskId::new(), user: &alice(), home: "/x", workspace: None };
    let forged = forge(&app, &cluster, &inputs, &req).unwrap();
    let exec = &forged.scripts[1];
    bash_n(&exec.text).unwrap();
    assert!(!exec.text.contains("export HPCG_INPUT_v='"), "too big for the environment");
    let out = Command::new("bash").arg("/dev/stdin").stdin(std::process::Stdio::piped()).output_with(&exec.text);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!canary.exists(), "the injected command ran");
    let dir = PathBuf::from(&forged.run_dir);
    assert!(std::fs::read_to_string(dir.join("markup.out")).unwrap() == value, "markup changed the value");
    assert!(std::fs::read_to_string(dir.join("env.out")).unwrap() == value, "the value file changed it");
}

#[test]
fn a_forged_script_over_the_size_cap_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let (app, cluster) = hostile_definitions(work.path());
    // The hostile execute script uses the value nine times: about 9 MiB.
    let inputs = app.validator.validate(&json!({ "v": "x".repeat(1 << 20) }), &cluster.spec).unwrap();
    let req = ForgeRequest { task_id: TaskId::new(), user: &alice(), home: "/x", workspace: None };
    let p = forge(&app, &cluster, &inputs, &req).unwrap_err();
    assert!(p.iter().any(|x| x.rule.as_deref() == Some("size") && x.message.contains("execute")), "{p}");
}

// ---------------------------------------------------------------------------
// Upload-time refusals, preview over HTTP and the CLI, recorded scripts
// ---------------------------------------------------------------------------

fn folder_body(kind: &str, name: &str) -> Value {
    match kind {
        "app" => serde_json::to_value(
            folder::load_application(&repo().join("applications").join(name), &UploadLimits::default()).unwrap().upload,
        )
        .unwrap(),
        _ => serde_json::to_value(
            folder::load_cluster(&repo().join("clusters").join(name), None, &UploadLimits::default()).unwrap().upload,
        )
        .unwrap(),
    }
}

async fn put(app: &crate::helpers::TestApp, path: &str, body: &Value) -> (StatusCode, Value) {
    let resp = app.req(reqwest::Method::PUT, path, "admin").await.json(body).send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

async fn post(app: &crate::helpers::TestApp, path: &str, body: &Value, user: &str) -> (StatusCode, Value) {
    let resp = app.req(reqwest::Method::POST, path, user).await.json(body).send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

fn messages(v: &Value) -> String {
    v["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| format!("{}: {}", e["pointer"].as_str().unwrap(), e["message"].as_str().unwrap()))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

async fn undeclared_or_unsafe_markup_is_refused_at_upload(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut body = folder_body("app", "sleep");
    body["files"]["app_execute"] = json!("#!/bin/bash\nsleep @@ sleep @@\necho @@ nap_time @@\n");
    body["files"]["app_epilog"] = json!("#!/bin/bash\nf=@@ input_files @@\necho \"got @@ input_files @@\"\n");
    let (s, v) = put(&app, "/api/v1/applications/sleep", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let text = messages(&v);
    assert!(text.contains("/files/app_execute: line 3: unknown markup `nap_time`"), "{text}");
    assert!(
        text.contains("/files/app_epilog: line 3, column 11: `@@ input_files @@` stands inside double quotes"),
        "{text}"
    );
    assert_eq!(t.raw_blobs().await, [], "nothing stored");

    let mut cluster = folder_body("cluster", "local-slurm");
    cluster["files"]["forge/script_common"] =
        json!("#!/bin/bash\n#SBATCH --job-name=@@ sleep @@\n@@ HPCG_PAYLOAD @@\n");
    let (s, v) = put(&app, "/api/v1/clusters/local-slurm", &cluster).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(messages(&v).contains("unknown markup `sleep`: a cluster template serves every application"), "{v}");
}

async fn preview_over_http_answers_three_scripts_or_every_problem(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    put(&app, "/api/v1/applications/sleep", &folder_body("app", "sleep")).await;
    put(&app, "/api/v1/clusters/local-slurm", &folder_body("cluster", "local-slurm")).await;
    let body = json!({ "application": "sleep", "cluster": "local-slurm", "inputs": [{ "name": "sleep", "type": "int", "value": 7 }] });
    let (s, v) = post(&app, "/api/v1/forge/preview", &body, "alice").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let scripts = v["data"]["scripts"].as_array().unwrap();
    assert_eq!(
        scripts.iter().map(|s| s["phase"].as_str().unwrap()).collect::<Vec<_>>(),
        ["prolog", "execute", "epilog"]
    );
    let exec = scripts[1]["text"].as_str().unwrap();
    assert!(exec.contains("\nseconds=7\n") && exec.contains("#SBATCH --comment=hpcforge:"), "{exec}");
    assert_eq!(v["data"]["user"], "alice");
    assert!(v["data"]["run_dir"].as_str().unwrap().starts_with("/home/alice/hpcforge/"));
    assert_eq!(v["data"]["application"], json!({ "name": "sleep", "version": 1 }));
    // Nothing was stored by a preview.
    assert!(t.raw_blobs().await.iter().all(|(n, _)| !n.starts_with("tasks/")));

    let bad = json!({ "application": "sleep", "cluster": "local-slurm", "inputs": [
        { "name": "sleep", "value": -1 }, { "name": "input_files", "files": [{ "action": "COPY", "path": "../x" }] }, { "name": "extra" } ] });
    let (s, v) = post(&app, "/api/v1/forge/preview", &bad, "alice").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let got: Vec<(&str, &str)> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["pointer"].as_str().unwrap(), e["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        [("/inputs/0/value", "minimum"), ("/inputs/1/files/0/path", "pattern"), ("/inputs/2/name", "unknown")]
    );

    let (s, _) =
        post(&app, "/api/v1/forge/preview", &json!({ "application": "nope", "cluster": "local-slurm" }), "alice").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = post(
        &app,
        "/api/v1/forge/preview",
        &json!({ "application": "sleep", "cluster": "local-slurm", "extra": 1 }),
        "alice",
    )
    .await;
    assert_eq!((s, v["errors"][0]["pointer"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("/extra")));

    // The schema portals can check forms against.
    let resp = app.req(reqwest::Method::GET, "/api/v1/applications/sleep/schema", "alice").await.send().await.unwrap();
    let schema: Value = resp.json().await.unwrap();
    assert_eq!(schema["data"]["properties"]["sleep"], json!({ "type": "integer", "minimum": 0.0, "maximum": 86400.0 }));
}

async fn an_application_without_an_environment_for_the_cluster_is_refused(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut body = folder_body("app", "sleep");
    body["files"].as_object_mut().unwrap().remove("cluster/local-slurm");
    body["files"].as_object_mut().unwrap().remove("cluster/local");
    body["files"].as_object_mut().unwrap().remove("cluster/local-sge");
    body["files"]["cluster/elsewhere"] = json!("true\n");
    put(&app, "/api/v1/applications/sleep", &body).await;
    put(&app, "/api/v1/clusters/local-slurm", &folder_body("cluster", "local-slurm")).await;
    let (s, v) =
        post(&app, "/api/v1/forge/preview", &json!({ "application": "sleep", "cluster": "local-slurm" }), "alice")
            .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        messages(&v).contains(
            "does not run on cluster `local-slurm`: it has no cluster environment for it (it runs on elsewhere)"
        ),
        "{v}"
    );
}

/// Grid Engine gives a job more than one slot only in a parallel environment: with
/// none named, a multi-CPU phase is refused, saying why, instead of running on one;
/// with one, the script asks for the slots there.
async fn a_multi_cpu_phase_on_grid_engine_needs_a_parallel_environment(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut wide = folder_body("app", "sleep");
    wide["definition"]["resources"]["execute"]["cpus"] = json!(2);
    put(&app, "/api/v1/applications/sleep", &wide).await;
    let mut bare = folder_body("cluster", "local-sge");
    bare["definition"].as_object_mut().unwrap().remove("parallel_environment");
    put(&app, "/api/v1/clusters/local-sge", &bare).await;
    let preview = json!({ "application": "sleep", "cluster": "local-sge" });
    let (s, v) = post(&app, "/api/v1/forge/preview", &preview, "alice").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        messages(&v).contains(
            "asks for 2 CPUs in its execute phase; Grid Engine cluster `local-sge` names no `parallel_environment`"
        ),
        "{v}"
    );
    put(&app, "/api/v1/clusters/local-sge", &folder_body("cluster", "local-sge")).await;
    let (s, v) = post(&app, "/api/v1/forge/preview", &preview, "alice").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let scripts = v["data"]["scripts"].as_array().unwrap();
    let script = |phase: &str| scripts.iter().find(|x| x["phase"] == phase).unwrap()["text"].as_str().unwrap();
    assert!(script("execute").contains("\n#$ -pe smp 2\n"), "{}", script("execute"));
    assert!(!script("prolog").contains("#$ -pe"), "one CPU needs no parallel environment");
}

async fn forged_scripts_are_recorded_with_their_versions_and_sha256(t: TestStore) {
    let app = local::application(repo(), &AppName::parse("sleep").unwrap()).unwrap();
    let cluster = local::cluster(repo(), &ClusterName::parse("local-slurm").unwrap(), None).unwrap();
    let inputs = app.validator.validate(&json!({}), &cluster.spec).unwrap();
    let task = TaskId::new();
    let forged = forge(
        &app,
        &cluster,
        &inputs,
        &ForgeRequest { task_id: task, user: &alice(), home: "/home/alice", workspace: None },
    )
    .unwrap();
    let v1 = t.store.put_task_scripts(&task, &alice(), &forged, time::OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!(v1, 1);
    for s in &forged.scripts {
        let stored = t.store.read_task_script(&task, s.phase, None).await.unwrap().unwrap();
        assert_eq!(
            (stored.text.as_str(), stored.sha256.as_str(), stored.version),
            (s.text.as_str(), s.sha256.as_str(), 1)
        );
        assert_eq!(
            (stored.application.name.as_str(), stored.cluster.name.as_str(), stored.owner.as_str()),
            ("sleep", "local-slurm", "alice")
        );
    }
    let v2 = t.store.put_task_scripts(&task, &alice(), &forged, time::OffsetDateTime::now_utc()).await.unwrap();
    assert_eq!(v2, 2, "forging again (a restart) is a new version");
    assert_eq!(t.store.read_task_script(&task, Phase::EXECUTE, Some(1)).await.unwrap().unwrap().version, 1);
    assert!(t.store.read_task_script(&TaskId::new(), Phase::EXECUTE, None).await.unwrap().is_none());
    let names: Vec<String> = t
        .raw_blobs()
        .await
        .into_iter()
        .filter(|(n, _)| n.starts_with("tasks/"))
        .map(|(n, v)| format!("{n}@{v}"))
        .collect();
    let expect: Vec<String> = [1, 2]
        .iter()
        .flat_map(|v| ["epilog", "execute", "prolog"].map(|p| format!("tasks/{task}/script_{p}@{v}")))
        .collect();
    let mut expect = expect;
    expect.sort();
    assert_eq!(names, expect);
}

/// A declared graph with every kind of mistake, uploaded over HTTP: each problem comes
/// back at once, under its pointer into the upload, and nothing is stored.
async fn a_broken_phase_graph_is_refused_at_upload_with_every_problem(t: TestStore) {
    let app = spawn_app(t.store.clone()).await;
    let mut body = folder_body("app", "workflow");
    body["definition"]["phases"][0]["after"] = json!(["postprocess"]); // a circle through every phase
    body["definition"]["phases"][1]["needs"] = json!(["../data.csv"]);
    body["definition"]["phases"][2]["after"] = json!([{ "phase": "nope", "when": "ended" }]);
    body["definition"]["resources"]["render"] = json!({ "cpus": 1 });
    body["files"]["app_render"] = json!("#!/bin/sh\ntrue\n");
    body["files"].as_object_mut().unwrap().remove("app_histogram");
    let (s, v) = put(&app, "/api/v1/applications/workflow", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let text = messages(&v);
    for line in [
        "/definition/phases/1/needs/0: the path leaves the run directory (`..`)",
        "/definition/phases/2/after/0: phase `histogram` waits for `nope`, which is not declared",
        "/files/app_histogram: the required file `app_histogram` is missing",
        "/files/app_render: unexpected file `app_render`: the application declares no phase `render`",
    ] {
        assert!(text.contains(line), "{line}\n---\n{text}");
    }
    assert_eq!(t.raw_blobs().await, [], "nothing stored");
    // With those mended, the circle (hidden behind them) is named, in the order things would run.
    body["definition"]["phases"][1]["needs"] = json!(["data.csv"]);
    body["definition"]["phases"][2]["after"] = json!([]);
    body["definition"]["resources"].as_object_mut().unwrap().remove("render");
    body["files"].as_object_mut().unwrap().remove("app_render");
    body["files"]["app_histogram"] = json!("#!/bin/sh\ntrue\n");
    let (s, v) = put(&app, "/api/v1/applications/workflow", &body).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let text = messages(&v);
    assert!(text.contains("phases wait for each other in a circle"), "{text}");
    // postprocess waits for fit, preprocess (now) for postprocess, fit for preprocess.
    assert!(text.contains("`fit` → `postprocess` → `preprocess` → `fit`"), "{text}");
}

/// A phase that runs per frame: each array element runs its frames (two per job here,
/// side by side), each with `HPCG_FRAME`, each recording its own exit status; the job
/// fails if one of its frames did.
#[test]
fn a_frame_phase_runs_its_elements_frames_each_with_its_own_record() {
    let base = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    files.insert("forge/script_common".to_owned(), "#!/bin/bash\n@@ HPCG_PAYLOAD @@\n".to_owned());
    let spec: ClusterSpec =
        toml::from_str(&format!("name = 'local'\nscheduler = 'local'\nrun_dir_base = '{}'", base.path().display()))
            .unwrap();
    let cluster = CompiledCluster::compile(spec, 1, &files).unwrap();
    let app_spec: ApplicationSpec = toml::from_str(
        r#"
        name = "render"
        [[inputs]]
        name = "frames"
        type = "range"
        value = "1-9:2"
        [[phases]]
        name = "render"
        frames = "frames"
        frames_per_job = 2
        [resources.render]
        cpus = 2
        "#,
    )
    .unwrap();
    let app_files = BTreeMap::from([
        (
            "app_render".to_owned(),
            "#!/bin/sh\necho \"frame $HPCG_FRAME of $HPCG_FRAMES\"\nsleep 1\n[ \"$HPCG_FRAME\" != 7 ]\n".to_owned(),
        ),
        ("cluster/local".to_owned(), "true\n".to_owned()),
    ]);
    let app = CompiledApp::compile(app_spec, 1, &app_files).unwrap();
    let inputs = app.validator.validate(&json!({}), &cluster.spec).unwrap();
    let req = ForgeRequest { task_id: TaskId::new(), user: &alice(), home: "/home/alice", workspace: None };
    let forged = forge(&app, &cluster, &inputs, &req).unwrap();
    let script = &forged.scripts[0].text;
    bash_n(script).unwrap();
    let run = |element: &str| {
        let started = std::time::Instant::now();
        let out = Command::new("bash")
            .arg("-c")
            .arg(script)
            .env("HPCG_LOCAL_INDEX", element)
            .env("HPCG_LOCAL_JOB", "77.render")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), started.elapsed())
    };
    // The submission says which frames run; without it, none does.
    let hpcg = Path::new(&forged.run_dir).join(".hpcforge");
    std::fs::create_dir_all(hpcg.join("frames")).unwrap();
    let (ok, _, _) = run("1");
    assert!(!ok, "no frames to run were written");
    std::fs::write(hpcg.join("frames/render.run"), "1-9:2\n").unwrap();
    // Element 1: frames 1 and 3, side by side (2 CPUs): both sleep 1 s, about 1 s in all.
    let (ok, out, took) = run("1");
    assert!(ok, "{out}");
    assert!(out.contains("frame 1 of 1-9:2") && out.contains("frame 3 of 1-9:2"), "{out}");
    assert!(took < Duration::from_millis(1900), "side by side: {took:?}");
    // Element 2: frames 5 and 7; 7 fails, so the job does.
    let (ok, out, _) = run("2");
    assert!(!ok, "{out}");
    let records = hpcg.join("frames/render");
    let record = |f: &str| std::fs::read_to_string(records.join(f)).unwrap();
    let rc = |f: &str| record(f).split(' ').next().unwrap().to_owned();
    assert_eq!((rc("1"), rc("3"), rc("5"), rc("7")), ("0".into(), "0".into(), "0".into(), "1".into()));
    // Each record names the job and the element that ran it, then what the frame
    // used: CPU ticks, ticks a second, the node.
    let fields: Vec<String> = record("7").split_whitespace().map(str::to_owned).collect();
    assert_eq!(fields.len(), 8, "{}", record("7"));
    assert_eq!((fields[3].as_str(), fields[4].as_str()), ("77.render", "2"), "{}", record("7"));
    assert!(fields[5].parse::<u64>().is_ok() && fields[6].parse::<u64>().is_ok_and(|h| h > 0), "{}", record("7"));
    // Element 3: frame 9 alone.
    let (ok, out, _) = run("3");
    assert!(ok && out.contains("frame 9 of") && !out.contains("frame 7"), "{out}");
    // A rerun of frame 7 alone: element 1 runs it, and the whole range is still said.
    std::fs::write(hpcg.join("frames/render.run"), "7\n").unwrap();
    let (ok, out, _) = run("1");
    assert!(!ok && out.trim() == "frame 7 of 1-9:2", "{out}");
    // Something else than a frame range where the frames to run are is refused.
    std::fs::write(hpcg.join("frames/render.run"), "1;touch pwned\n").unwrap();
    let (ok, _, _) = run("1");
    assert!(!ok && !Path::new(&forged.run_dir).join("pwned").exists());
}

/// A cluster's template for one phase name serves that phase of any application that
/// declares it; the other phases use `script_common`.
#[test]
fn a_cluster_template_for_a_declared_phase_is_used_for_that_phase_only() {
    let mut files = BTreeMap::new();
    files.insert("forge/script_common".to_owned(), "#!/bin/bash\n# common\n@@ HPCG_PAYLOAD @@\n".to_owned());
    files.insert("forge/script_fit".to_owned(), "#!/bin/bash\n# fit's own\n@@ HPCG_PAYLOAD @@\n".to_owned());
    let spec: ClusterSpec = toml::from_str("name = 'local'\nscheduler = 'local'\nrun_dir_base = '/tmp/r'").unwrap();
    let cluster = CompiledCluster::compile(spec, 1, &files).unwrap();
    let app = local::application(repo(), &AppName::parse("workflow").unwrap()).unwrap();
    let inputs = app.validator.validate(&json!({}), &cluster.spec).unwrap();
    let req = ForgeRequest { task_id: TaskId::new(), user: &alice(), home: "/home/alice", workspace: None };
    let forged = forge(&app, &cluster, &inputs, &req).unwrap();
    let names: Vec<&str> = forged.scripts.iter().map(|s| s.phase.as_str()).collect();
    assert_eq!(names, ["preprocess", "fit", "histogram", "postprocess"]);
    for s in &forged.scripts {
        let own = s.text.contains("# fit's own\n");
        assert_eq!(own, s.phase.as_str() == "fit", "{}", s.phase);
        assert_eq!(s.text.contains("# common\n"), !own, "{}", s.phase);
        assert!(s.text.contains(&format!("export HPCG_TASK_ID={} HPCG_PHASE={}", req.task_id, s.phase)));
        bash_n(&s.text).unwrap();
    }
}

crate::for_each_store!(
    undeclared_or_unsafe_markup_is_refused_at_upload,
    preview_over_http_answers_three_scripts_or_every_problem,
    an_application_without_an_environment_for_the_cluster_is_refused,
    a_multi_cpu_phase_on_grid_engine_needs_a_parallel_environment,
    forged_scripts_are_recorded_with_their_versions_and_sha256,
    a_broken_phase_graph_is_refused_at_upload_with_every_problem,
);

#[test]
fn the_cli_previews_offline_from_the_repository_folders() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("task.json");
    std::fs::write(&inputs, r#"{"application": "pi", "cluster": "local-slurm", "inputs": {"samples": 5000}}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hpcforge"))
        .current_dir(repo())
        .args([
            "forge",
            "preview",
            "--from-dir",
            "--inputs",
            inputs.to_str().unwrap(),
            "--phase",
            "execute",
            "--as",
            "bob",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    bash_n(&text).unwrap();
    assert!(
        text.contains("export HPCG_INPUT_samples=5000")
            && text.contains("/usr/bin/env python3 \"$hpcg_dir\"/app_execute"),
        "{text}"
    );
    assert!(text.contains(" HPCG_USER=bob "), "{text}");

    // Problems come back per field, and the exit code says so.
    let out = Command::new(env!("CARGO_BIN_EXE_hpcforge"))
        .current_dir(repo())
        .args(["forge", "preview", "--from-dir", "--app", "pi", "--cluster", "local-slurm", "--inputs", "-"])
        .stdin(std::process::Stdio::piped())
        .output_with(r#"{"samples": 1, "method": "fast"}"#);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/inputs/samples: `samples` must be at least 1000")
            && err.contains("/inputs/method: `method` must be one of"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_previews_through_a_server() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = spawn_app(t.store.clone()).await;
    put(&app, "/api/v1/applications/sleep", &folder_body("app", "sleep")).await;
    put(&app, "/api/v1/clusters/local-slurm", &folder_body("cluster", "local-slurm")).await;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let base = app.base.clone();
    let token = app.token("alice").await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hpcforge"))
            .args(["forge", "preview", "--app", "sleep", "--cluster", "local-slurm", "--server", &base])
            .env("HPCFORGE_TOKEN", token)
            .args(["--output-dir", out_dir.to_str().unwrap()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for phase in ["prolog", "execute", "epilog"] {
        let text = std::fs::read_to_string(dir.path().join(format!("out/script_{phase}"))).unwrap();
        assert!(text.contains(&format!("HPCG_PHASE={phase}")), "{text}");
    }
}

// ---------------------------------------------------------------------------
// The test environment's Slurm accepts and runs the forged scripts
// ---------------------------------------------------------------------------

fn ssh_as_alice() -> ssh2::Session {
    crate::helpers::ssh_as("alice")
}

fn run_as_alice(s: &ssh2::Session, command: &str, stdin: &str) -> (i32, String, String) {
    crate::helpers::run_remote(s, command, stdin)
}

fn forge_sleep_for_alice(seconds: i64) -> hpcforge::model::Forged {
    let app = local::application(repo(), &AppName::parse("sleep").unwrap()).unwrap();
    let cluster = local::cluster(repo(), &ClusterName::parse("local-slurm").unwrap(), None).unwrap();
    // /etc/hostname is a file alice can read: the example's default input.
    let inputs = app.validator.validate(&json!({ "sleep": seconds }), &cluster.spec).unwrap();
    forge(
        &app,
        &cluster,
        &inputs,
        &ForgeRequest { task_id: TaskId::new(), user: &alice(), home: "/home/alice", workspace: None },
    )
    .unwrap()
}

#[test]
fn the_forged_sleep_scripts_pass_sbatch_test_only() {
    let forged = forge_sleep_for_alice(20);
    let s = ssh_as_alice();
    let dir = &forged.run_dir;
    for script in &forged.scripts {
        let (code, out, err) = run_as_alice(
            &s,
            &format!(
                "mkdir -p {dir} && cat > {dir}/test-{} && sbatch --test-only {dir}/test-{}",
                script.phase, script.phase
            ),
            &script.text,
        );
        assert_eq!(code, 0, "{}: sbatch --test-only refused it: {out}{err}", script.phase);
        assert!(err.contains("to start at"), "{}: {err}", script.phase);
    }
    run_as_alice(&s, &format!("rm -rf {dir}"), "");
}

#[test]
fn the_forged_sleep_scripts_run_under_slurm_as_alice() {
    let forged = forge_sleep_for_alice(1);
    let s = ssh_as_alice();
    let dir = &forged.run_dir;
    // What the mediator will do: make the run directory and stage the inputs.
    run_as_alice(&s, &format!("mkdir -p {dir} && cp /etc/hostname {dir}/hostname"), "");
    for script in &forged.scripts {
        let phase = script.phase;
        let (code, out, err) = run_as_alice(
            &s,
            &format!("cat > {dir}/script_{phase} && sbatch --parsable --wait {dir}/script_{phase}"),
            &script.text,
        );
        assert_eq!(code, 0, "{phase}: {out}{err}");
        let job = out.trim();
        let (_, log, _) = run_as_alice(&s, &format!("cat {dir}/{phase}-{job}.out"), "");
        assert!(
            log.contains(&format!("phase {phase}, Slurm job {job} on")) && log.contains(" as alice"),
            "{phase}: {log}"
        );
        match phase {
            Phase::PROLOG => assert!(log.contains("prolog: inputs staged here:") && log.contains("hostname"), "{log}"),
            Phase::EXECUTE => {
                assert!(log.contains("execute: sleeping 1s as alice") && log.contains("execute: done"), "{log}")
            }
            Phase::EPILOG => assert!(
                log.contains(&format!(
                    "epilog: task {} on local-slurm ended",
                    forged.run_dir.rsplit('/').next().unwrap()
                )),
                "{log}"
            ),
            other => panic!("sleep has no phase {other}"),
        }
    }
    let (_, listing, _) = run_as_alice(&s, &format!("ls -a {dir}/.hpcforge"), "");
    assert!(listing.contains("app_execute") && listing.contains("env_execute.sh"), "{listing}");
    run_as_alice(&s, &format!("rm -rf {dir}"), "");
}
