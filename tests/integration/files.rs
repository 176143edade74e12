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

    let get = |path: String, range: Option<&'static str>| {
        let app = &app;
        async move {
            let mut req = app.req(Method::GET, &path, "alice").await;
            if let Some(r) = range {
                req = req.header("Range", r);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            (status, headers, resp.bytes().await.unwrap().to_vec())
        }
    };
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
