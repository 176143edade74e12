//! A task's files back to its user, on real Slurm over sshd: the run directory listed,
//! a file downloaded whole and by ranges, byte for byte what is on the cluster, and
//! the paths that must be refused (climbing out, a symbolic link out, another
//! user's task).

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::mediator::{call, is_final, put, remote, setup, submit, variant, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_files_are_listed_and_downloaded_whole_or_in_ranges_and_nothing_outside_them() {
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    // 20 MB of random bytes, a name with a space in a folder, a link out of the run
    // directory, and one inside it.
    let execute = "#!/bin/bash\nset -e\nmkdir -p 'out dir'\nhead -c 20000000 /dev/urandom > 'out dir/big file.bin'\n\
                   printf 'hello\\n' > small.txt\n: > empty\nln -s /etc/hostname escape\nln -s small.txt inside\n";
    put(&app, "/api/v1/applications/files", &variant("files", &[("app_execute", execute)])).await;
    let task = submit(&app, "alice", "files", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, "alice", &id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let run_dir = done["run_dir"].as_str().unwrap().to_owned();

    let (s, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/files"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let files = v["data"]["files"].as_array().unwrap();
    let entry = |p: &str| files.iter().find(|f| f["path"] == p).unwrap_or_else(|| panic!("{p} not listed: {v:#}"));
    assert_eq!(
        (&entry("out dir/big file.bin")["kind"], &entry("out dir/big file.bin")["size"]),
        (&json!("file"), &json!(20_000_000))
    );
    assert_eq!(entry("out dir")["kind"], "dir");
    assert_eq!(entry("escape")["kind"], "link");
    assert!(entry("small.txt")["modified"].as_str().unwrap().starts_with("20"), "{v:#}");

    let get = |path: String, range: Option<&'static str>| fetch(&app, path, range);
    let url = |p: &str| format!("/api/v1/tasks/{id}/files/{p}");
    // Whole: byte for byte what the cluster has (its sha256 read there, as alice).
    let (code, sums) =
        remote("alice", format!("cd {run_dir} && sha256sum 'out dir/big file.bin' | cut -d' ' -f1")).await;
    assert_eq!(code, 0, "{sums}");
    let (s, h, body) = get(url("out%20dir/big%20file.bin"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body.len(), 20_000_000);
    assert_eq!(hpcforge::definitions::script::sha256_hex(&body), sums.trim());
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["content-disposition"], "attachment; filename=\"big_file.bin\"");
    // The same with its folder's slash percent-encoded.
    let (s, _, again) = get(url("out%20dir%2Fbig%20file.bin"), Some("bytes=0-9")).await;
    assert_eq!((s, again.as_slice()), (StatusCode::PARTIAL_CONTENT, &body[..10]));
    // Ranges.
    let (s, h, part) = get(url("out%20dir/big%20file.bin"), Some("bytes=1000-1999")).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(h["content-range"], "bytes 1000-1999/20000000");
    assert_eq!(part, body[1000..2000]);
    let (_, _, tail) = get(url("out%20dir/big%20file.bin"), Some("bytes=-7")).await;
    assert_eq!(tail, body[body.len() - 7..]);
    let (_, h, rest) = get(url("out%20dir/big%20file.bin"), Some("bytes=19999990-")).await;
    assert_eq!(rest, body[19_999_990..]);
    assert_eq!(h["content-range"], "bytes 19999990-19999999/20000000");
    let (s, h, _) = get(url("small.txt"), Some("bytes=6-")).await;
    assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(h["content-range"], "bytes */6");
    let (s, _, _) = get(url("small.txt"), Some("bytes=9-3")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Small, empty, and a link that stays inside.
    assert_eq!(get(url("small.txt"), None).await.2, b"hello\n");
    let (s, h, b) = get(url("empty"), None).await;
    assert_eq!((s, b.len()), (StatusCode::OK, 0));
    assert_eq!(h["content-length"], "0");
    assert_eq!(get(url("inside"), None).await.2, b"hello\n");
    // Refused: out through a link, up with `..`, absolute, a folder, nothing there.
    for (path, status, words) in [
        ("escape", StatusCode::UNPROCESSABLE_ENTITY, "leads out"),
        ("out%20dir%2F..%2F..%2Fetc%2Fpasswd", StatusCode::UNPROCESSABLE_ENTITY, "leads out"),
        ("%2Fetc%2Fpasswd", StatusCode::UNPROCESSABLE_ENTITY, "absolute"),
        ("out%20dir", StatusCode::NOT_FOUND, "not a regular file"),
        ("nothing.txt", StatusCode::NOT_FOUND, "there is no"),
    ] {
        let (s, v) = call(&app, Method::GET, &url(path), "alice", None).await;
        assert_eq!(s, status, "{path}: {v}");
        assert!(v["message"].as_str().unwrap_or("").contains(words) || v.to_string().contains(words), "{path}: {v}");
    }
    // Another user sees neither the listing nor a file.
    for path in [format!("/api/v1/tasks/{id}/files"), url("small.txt")] {
        let (s, _) = call(&app, Method::GET, &path, "bob", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    let _ = remote("alice", format!("rm -rf {run_dir}")).await;
}

/// GET `path` as alice, with a `Range` header when given: status, headers, body.
async fn fetch(
    app: &crate::helpers::TestApp,
    path: String,
    range: Option<&'static str>,
) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = app.req(Method::GET, &path, "alice").await;
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    let resp = req.send().await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

/// The peak resident memory of this test's process so far (nextest runs each test in
/// a process of its own, with the server inside it), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").trim();
    kb.parse::<u64>().unwrap() * 1024
}

/// The outputs as one tarball on real Slurm: 200 MB of declared outputs stream
/// through the server (its peak memory measured and bounded), unpack byte for byte
/// as on the cluster, without what a link out of the run directory points to; chosen
/// paths instead of the declared ones; refusals said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outputs_come_as_one_tarball_streamed_byte_for_byte_in_bounded_memory() {
    use std::io::Write as _;
    let t = crate::helpers::store(crate::helpers::Backend::Embedded).await;
    let app = setup(&t).await;
    let execute = "#!/bin/bash\nset -e\nmkdir -p 'out dir' logs\nfor i in 1 2 3 4; do head -c 50000000 /dev/urandom > \"out dir/part $i.bin\"; done\n\
                   echo done > logs/run.log\nprintf 'hello\\n' > small.txt\nln -s /etc/hostname escape\n";
    let mut body = variant("bundled", &[("app_execute", execute)]);
    body["definition"]["outputs"] = json!(["out dir/*.bin", "small.txt", "escape", "missing-*"]);
    put(&app, "/api/v1/applications/bundled", &body).await;
    // Outputs are checked at upload, each problem where it is.
    let mut bad = body.clone();
    bad["definition"]["outputs"] = json!(["/etc/*", "../up", "ok/*"]);
    let (s, v) = call(&app, Method::PUT, "/api/v1/applications/bundled", "admin", Some(&bad)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let pointers: Vec<&str> = v["errors"].as_array().unwrap().iter().filter_map(|e| e["pointer"].as_str()).collect();
    assert_eq!(pointers, ["/definition/outputs/0", "/definition/outputs/1"], "{v}");

    let task = submit(&app, "alice", "bundled", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let done = wait_for(&app, "alice", &id, 180, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let run_dir = done["run_dir"].as_str().unwrap().to_owned();
    let (code, sums) = remote("alice", format!("cd {run_dir} && sha256sum 'out dir'/*.bin small.txt | sort -k2")).await;
    assert_eq!(code, 0, "{sums}");

    let tmp = tempfile::tempdir().unwrap();
    let before = peak_rss();
    let mut resp =
        app.req(Method::GET, &format!("/api/v1/tasks/{id}/outputs.tar.gz"), "alice").await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/gzip");
    let tgz = tmp.path().join("outputs.tar.gz");
    let mut file = std::fs::File::create(&tgz).unwrap();
    let mut bytes = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        bytes += chunk.len() as u64;
        file.write_all(&chunk).unwrap();
    }
    drop(file);
    let grew = peak_rss().saturating_sub(before);
    eprintln!("outputs tarball: {bytes} bytes; the test process's peak memory grew by {} MiB", grew >> 20);
    assert!(bytes > 200_000_000, "random bytes do not compress: {bytes}");
    // A server that held the tarball would grow by its 200 MB.
    assert!(grew < 100 << 20, "peak memory grew by {} MiB during a 200 MB download", grew >> 20);
    let unpacked = tmp.path().join("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let ok = std::process::Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(&unpacked).status().unwrap();
    assert!(ok.success());
    let here = std::process::Command::new("sh")
        .arg("-c")
        .arg("sha256sum 'out dir'/*.bin small.txt | sort -k2")
        .current_dir(&unpacked)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&here.stdout), sums, "byte for byte");
    assert!(!unpacked.join("escape").exists() && !unpacked.join("logs").exists(), "only the outputs, no link out");

    // Chosen paths instead: a folder and a file.
    let (status, names) =
        tarball_names(&app, &format!("/api/v1/tasks/{id}/outputs.tar.gz?path=logs&path=small.txt")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(names, ["logs/", "logs/run.log", "small.txt"]);
    for (query, status) in [
        ("path=..%2Fother", StatusCode::UNPROCESSABLE_ENTITY),
        ("path=nothing-here", StatusCode::NOT_FOUND),
        ("file=small.txt", StatusCode::BAD_REQUEST),
    ] {
        let (s, v) =
            call(&app, Method::GET, &format!("/api/v1/tasks/{id}/outputs.tar.gz?{query}"), "alice", None).await;
        assert_eq!(s, status, "{query}: {v}");
    }
    let (s, _) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/outputs.tar.gz"), "bob", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "not bob's task");
    let _ = remote("alice", format!("rm -rf {run_dir}")).await;
}

/// The names in a tarball the API answers, sorted.
async fn tarball_names(app: &crate::helpers::TestApp, path: &str) -> (StatusCode, Vec<String>) {
    use std::io::Write as _;
    let resp = app.req(Method::GET, path, "alice").await.send().await.unwrap();
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap();
    let mut tar = std::process::Command::new("tar")
        .arg("-tz")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tar.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = String::from_utf8(tar.wait_with_output().unwrap().stdout).unwrap();
    let mut names: Vec<String> = out.lines().map(str::to_owned).collect();
    names.sort();
    (status, names)
}

/// Outputs kept in the store (`[archive]`) on real Slurm with MongoDB: when the task
/// ends they are copied into GridFS as its owner, each file with its sha256, those
/// over the caps left out and named; after the run directory is purged they are still
/// listed, downloaded whole and by ranges (across chunk boundaries) and bundled, byte
/// for byte what the job wrote. A cancelled task's outputs are not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_outputs_outlive_the_run_directory_and_download_the_same_way() {
    use std::io::Read as _;
    let t = crate::helpers::store(crate::helpers::Backend::Mongo).await;
    let app = setup(&t).await;
    // 700 kB (three GridFS chunks) of random bytes, a small file in a folder, an
    // empty one, a 3 MB one over the 2 MB a file may have, a link out, a staged-like
    // log that is not an output.
    let execute = "#!/bin/bash\nset -e\nmkdir -p out/sub\nhead -c 700000 /dev/urandom > out/a.bin\n\
                   printf 'hello\\n' > 'out/sub/b c.txt'\n: > out/empty\nhead -c 3000000 /dev/urandom > big.bin\n\
                   ln -s /etc/hostname out/leak\necho log > run.log\ntouch 'out/$(touch PWNED);q\".txt'\n";
    let mut body = variant("kept", &[("app_execute", execute)]);
    body["definition"]["archive"] = json!({ "max_file_mb": 2 });
    // An archive keeps declared outputs: none declared is refused where it is.
    let (s, v) = call(&app, Method::PUT, "/api/v1/applications/kept", "admin", Some(&body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v.to_string().contains("/definition/archive"), "{v}");
    body["definition"]["outputs"] = json!(["out", "big.bin"]);
    put(&app, "/api/v1/applications/kept", &body).await;

    let task = submit(&app, "alice", "kept", "local-slurm", json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    assert_eq!(task["archive"]["state"], "waiting", "{task:#}");
    let done = wait_for(&app, "alice", &id, 180, "the outputs to be kept", |t| {
        t["archive"]["state"] != "waiting" && is_final(t)
    })
    .await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let archive = &done["archive"];
    assert_eq!(archive["state"], "done", "{done:#}");
    assert_eq!((archive["kept"].as_u64(), archive["bytes"].as_u64()), (Some(4), Some(700_006)), "{archive}");
    assert_eq!(archive["left_out"][0]["path"], "big.bin", "{archive}");
    assert!(archive["left_out"][0]["why"].as_str().unwrap().contains("over the 2 MB a file may have"), "{archive}");
    let (_, events) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/events"), "alice", None).await;
    assert!(events.to_string().contains("4 outputs (700 kB) kept in the store; 1 left out (big.bin: 3 MB"), "{events}");
    // In GridFS under the design's names, readable by any GridFS client.
    let db = t.mongo.as_ref().unwrap();
    let mut gridfs = Vec::new();
    futures::AsyncReadExt::read_to_end(
        &mut db
            .gridfs_bucket(None)
            .open_download_stream_by_name(format!("tasks/{id}/outputs/out/sub/b c.txt"))
            .await
            .unwrap(),
        &mut gridfs,
    )
    .await
    .unwrap();
    assert_eq!(gridfs, b"hello\n");

    let run_dir = done["run_dir"].as_str().unwrap().to_owned();
    let (code, sums) = remote("alice", format!("cd {run_dir} && sha256sum out/a.bin 'out/sub/b c.txt'")).await;
    assert_eq!(code, 0, "{sums}");
    let sum_of = |name: &str| sums.lines().find(|l| l.ends_with(name)).unwrap().split(' ').next().unwrap().to_owned();
    // A name that is shell syntax was copied as a name, never run.
    let (code, out) = remote("alice", format!("cd {run_dir} && ls out; test ! -e PWNED && test ! -e ~/PWNED")).await;
    assert_eq!(code, 0, "{out}");
    // The scratch purge: the run directory is gone.
    let (code, out) = remote("alice", format!("rm -rf {run_dir}")).await;
    assert_eq!(code, 0, "{out}");

    let (s, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/files"), "alice", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["source"], "archive", "{v}");
    let listed: Vec<(&str, &str)> = v["data"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["sha256"].as_str().unwrap()))
        .collect();
    let (a_sum, b_sum) = (sum_of("out/a.bin"), sum_of("b c.txt"));
    let empty_sum = hpcforge::definitions::script::sha256_hex(b"");
    let hostile = "out/$(touch PWNED);q\".txt";
    assert_eq!(
        listed,
        [
            (hostile, empty_sum.as_str()),
            ("out/a.bin", a_sum.as_str()),
            ("out/empty", empty_sum.as_str()),
            ("out/sub/b c.txt", b_sum.as_str())
        ]
    );

    let get = |path: String, range: Option<&'static str>| fetch(&app, path, range);
    let url = |p: &str| format!("/api/v1/tasks/{id}/files/{p}");
    let (s, h, whole) = get(url("out/a.bin"), None).await;
    assert_eq!((s, h["hpcforge-source"].to_str().unwrap()), (StatusCode::OK, "archive"));
    assert_eq!(hpcforge::definitions::script::sha256_hex(&whole), a_sum, "byte for byte what the job wrote");
    let (s, h, part) = get(url("out/a.bin"), Some("bytes=261000-530000")).await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(h["content-range"], "bytes 261000-530000/700000");
    assert_eq!(part, whole[261_000..=530_000]);
    assert_eq!(get(url("out/a.bin"), Some("bytes=-5")).await.2, whole[699_995..]);
    assert_eq!(get(url("out/a.bin"), Some("bytes=700000-")).await.0, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(get(url("out/sub/b%20c.txt"), None).await.2, b"hello\n");
    let (s, h, e) = get(url("out/empty"), None).await;
    assert_eq!((s, e.len(), h["content-length"].to_str().unwrap()), (StatusCode::OK, 0, "0"));
    // Left out, and gone with the run directory.
    assert_eq!(get(url("big.bin"), None).await.0, StatusCode::NOT_FOUND);

    // The bundle, from the store, byte for byte.
    let (s, h, tgz) = get(format!("/api/v1/tasks/{id}/outputs.tar.gz"), None).await;
    assert_eq!((s, h["hpcforge-source"].to_str().unwrap()), (StatusCode::OK, "archive"));
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(tgz.as_slice()));
    let mut bundled = Vec::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        bundled.push((entry.path().unwrap().to_string_lossy().into_owned(), bytes));
    }
    let names: Vec<&str> = bundled.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [hostile, "out/a.bin", "out/empty", "out/sub/b c.txt"]);
    assert_eq!(bundled[1].1, whole);
    assert_eq!(bundled[3].1, b"hello\n");
    let (s, _, e) = get(url("out%2F%24(touch%20PWNED)%3Bq%22.txt"), None).await;
    assert_eq!((s, e.len()), (StatusCode::OK, 0), "the hostile name downloads as a name");
    // Still alice's only.
    for path in [format!("/api/v1/tasks/{id}/files"), url("out/a.bin"), format!("/api/v1/tasks/{id}/outputs.tar.gz")] {
        let (s, _) = call(&app, Method::GET, &path, "bob", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }

    // A cancelled task's outputs are not kept.
    let slow = variant("kept-slow", &[("app_execute", "#!/bin/bash\nmkdir -p out\necho x > out/x\nsleep 300\n")]);
    let mut slow = slow;
    slow["definition"]["outputs"] = json!(["out"]);
    slow["definition"]["archive"] = json!({});
    put(&app, "/api/v1/applications/kept-slow", &slow).await;
    let task = submit(&app, "alice", "kept-slow", "local-slurm", json!({})).await;
    let slow_id = task["id"].as_str().unwrap().to_owned();
    let (s, v) = call(&app, Method::DELETE, &format!("/api/v1/tasks/{slow_id}"), "alice", None).await;
    assert!(s.is_success(), "{v}");
    let ended = wait_for(&app, "alice", &slow_id, 120, "the cancelled task's archive to be skipped", |t| {
        t["archive"]["state"] == "skipped"
    })
    .await;
    assert_eq!(ended["state"], "cancelled", "{ended:#}");
    let slow_id: hpcforge::model::TaskId = slow_id.parse().unwrap();
    assert!(t.store.archived_files(&slow_id).await.unwrap().is_empty(), "nothing of it kept");
    let (_, events) = call(&app, Method::GET, &format!("/api/v1/tasks/{slow_id}/events"), "alice", None).await;
    assert!(events.to_string().contains("outputs not kept in the store: the task ended cancelled"), "{events}");
}
