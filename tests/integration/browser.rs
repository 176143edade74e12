//! The web page in a real browser: headless Chromium (Debian's `chromium`), driven over
//! WebDriver (`chromium-driver`) against the `hpcforge` binary as a new user runs it.
//! Sign in with a token, submit `sleep` to the `local` cluster from the form built
//! from its input specs (first with a value the server refuses, shown next to the
//! field), and watch the phases reach `completed` live.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use crate::helpers::{Server, test_env_var};

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    let exe = test_env_var("HPCFORGE_TEST_CHROMEDRIVER");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(&exe)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver { child, url }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": test_env_var("HPCFORGE_TEST_CHROMIUM"),
            // --no-sandbox: CI runs the tests as root, where Chromium's sandbox cannot start.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Waits until `check` returns `Some`, polling the page.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(secs), "waited {secs} s for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_signs_in_submits_the_sleep_example_and_watches_it_complete_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[]);
    let me = hpcforge::mediator::current_user().unwrap().to_string();
    let token = server.token(&me, "admin");
    let driver = start_driver();
    let c = browser(&driver).await;
    let result = async {
        c.goto(&server.base).await.unwrap();

        // A wrong token is refused, with the server's words.
        c.find(Locator::Css("#token")).await.unwrap().send_keys(&format!("hpcf_{}", "x".repeat(43))).await.unwrap();
        c.find(Locator::Css("#signin")).await.unwrap().click().await.unwrap();
        let refused = until(10, "the sign-in error", || async {
            Some(text_of(&c, "#signin-error").await).filter(|t| !t.is_empty())
        })
        .await;
        assert!(refused.contains("not known here"), "{refused}");

        let field = c.find(Locator::Css("#token")).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(&token).await.unwrap();
        c.find(Locator::Css("#signin")).await.unwrap().click().await.unwrap();
        let who = until(10, "signing in", || async { Some(text_of(&c, "#who").await).filter(|t| !t.is_empty()) }).await;
        assert_eq!(who, format!("{me} (admin)"));

        // The form is built from the application's input specs.
        c.find(Locator::Css("#tab-submit")).await.unwrap().click().await.unwrap();
        until(10, "the applications", || async {
            c.find(Locator::Css("#app option[value=sleep]")).await.ok().map(|_| ())
        })
        .await;
        c.find(Locator::Css("#app")).await.unwrap().select_by_value("sleep").await.unwrap();
        until(10, "the sleep form", || async { c.find(Locator::Css("#input-sleep")).await.ok().map(|_| ()) }).await;
        c.find(Locator::Css("#cluster")).await.unwrap().select_by_value("local").await.unwrap();
        let label = text_of(&c, ".field[data-input=sleep] label").await;
        assert_eq!(label, "Seconds to sleep", "the spec's label");
        let default = c.find(Locator::Css("#input-sleep")).await.unwrap().prop("value").await.unwrap();
        assert_eq!(default.as_deref(), Some("20"), "the spec's default");

        // A value the server refuses: its message shows next to the field.
        let seconds = c.find(Locator::Css("#input-sleep")).await.unwrap();
        seconds.clear().await.unwrap();
        seconds.send_keys("-5").await.unwrap();
        c.find(Locator::Css("#submit")).await.unwrap().click().await.unwrap();
        let error = until(10, "the field's error", || async {
            Some(text_of(&c, ".field-error[data-for=sleep]").await).filter(|t| !t.is_empty())
        })
        .await;
        assert!(error.contains("0"), "the server's message about the minimum: {error}");

        // A good value: the task runs, and the page follows it live to the end.
        seconds.clear().await.unwrap();
        seconds.send_keys("1").await.unwrap();
        c.find(Locator::Css("#submit")).await.unwrap().click().await.unwrap();
        let id = until(10, "the task row", || async {
            let row = c.find(Locator::Css("#tasks tbody tr[data-task]")).await.ok()?;
            row.attr("data-task").await.ok().flatten()
        })
        .await;
        until(90, "the task to complete on the page", || async {
            let row = c.find(Locator::Css(&format!("#tasks tbody tr[data-task='{id}']"))).await.ok()?;
            (row.attr("data-state").await.ok().flatten()? == "completed").then_some(())
        })
        .await;
        until(30, "every phase to show completed with its job ID", || async {
            let rows = c.find_all(Locator::Css("#phases tbody tr")).await.ok()?;
            let mut done = 0;
            for r in &rows {
                let state = r.attr("data-state").await.ok().flatten()?;
                let job = r.find(Locator::Css("td.job")).await.ok()?.text().await.ok()?;
                if state == "completed" && !job.is_empty() {
                    done += 1;
                }
            }
            (done == 3).then_some(())
        })
        .await;
        // A one-second job may be seen running or may go straight from pending to
        // completed between two polls: either way the page shows the transition.
        until(10, "the execute phase's completion among the events", || async {
            let items = c.find_all(Locator::Css("#detail-events li")).await.ok()?;
            for li in items {
                let t = li.text().await.ok()?;
                if t.contains("execute: ") && t.contains("→ completed") {
                    return Some(());
                }
            }
            None
        })
        .await;

        // What the job posted: its event marked as the job's, and its data.
        until(30, "the job's own event and its data", || async {
            let items = c.find_all(Locator::Css("#detail-events li.from-job")).await.ok()?;
            let mut said = false;
            for li in items {
                said |= li.text().await.ok()?.contains("slept: slept 1s");
            }
            let row = text_of(&c, "#detail-data tbody tr").await;
            (said && row.contains("slept_seconds") && row.contains("execute")).then_some(())
        })
        .await;

        // The job's output, read on the cluster as the user.
        c.find(Locator::Css("#phases tbody tr[data-phase=execute] button:nth-of-type(2)"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let out =
            until(10, "the output", || async { Some(text_of(&c, "#viewer").await).filter(|t| t.contains("sleeping")) })
                .await;
        assert!(out.contains(&format!("execute: sleeping 1s as {me}")), "{out}");

        // The run directory, listed on the cluster; `sleep` declares no outputs, so
        // there is no tarball to download.
        c.find(Locator::Css("#show-files")).await.unwrap().click().await.unwrap();
        let files = until(10, "the file list", || async {
            let items = c.find_all(Locator::Css("#viewer li[data-path]")).await.ok()?;
            let mut paths = Vec::new();
            for li in items {
                paths.push(li.attr("data-path").await.ok()??);
            }
            (!paths.is_empty()).then_some(paths)
        })
        .await;
        assert!(files.iter().any(|p| p.starts_with("execute") && p.ends_with(".out")), "{files:?}");
        let hidden = c.find(Locator::Css("#download-outputs")).await.unwrap().attr("hidden").await.unwrap();
        assert!(hidden.is_some(), "no outputs declared, no download button");

        // Many tasks: the list shows the newest 50, and "Older tasks" pages back
        // through the rest (the page reloads and signs in again from the session).
        let store = hpcforge::store::embedded::EmbeddedStore::open(&dir.path().join("hpcforge-data")).unwrap();
        for _ in 0..55 {
            let mut t = hpcforge::model::Task::new(
                hpcforge::model::UserName::parse(&me).unwrap(),
                hpcforge::model::DefinitionRef { name: hpcforge::model::AppName::parse("pi").unwrap(), version: 1 },
                hpcforge::model::DefinitionRef {
                    name: hpcforge::model::ClusterName::parse("local").unwrap(),
                    version: 1,
                },
                serde_json::json!({}),
                &hpcforge::model::workflow::PhaseGraph::default_shape(),
                time::OffsetDateTime::now_utc(),
            );
            t.state = hpcforge::model::TaskState::Completed;
            t.phases.iter_mut().for_each(|p| p.state = hpcforge::model::PhaseState::Completed);
            hpcforge::store::Store::insert_task(&store, &t).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await; // distinct milliseconds in the IDs
        }
        c.refresh().await.unwrap();
        let rows = until(10, "the newest 50 tasks", || async {
            let n = c.find_all(Locator::Css("#tasks tbody tr[data-task]")).await.ok()?.len();
            (n == 50).then_some(n)
        })
        .await;
        assert_eq!(rows, 50);
        c.find(Locator::Css("#older")).await.unwrap().click().await.unwrap();
        until(10, "all 56 tasks after one more page", || async {
            let n = c.find_all(Locator::Css("#tasks tbody tr[data-task]")).await.ok()?.len();
            (n == 56).then_some(())
        })
        .await;
        let last = c.find_all(Locator::Css("#tasks tbody tr[data-task]")).await.unwrap().pop().unwrap();
        assert_eq!(
            last.attr("data-task").await.unwrap().as_deref(),
            Some(id.as_str()),
            "the oldest, the sleep task, is last"
        );
        let older_hidden = c.find(Locator::Css("#older")).await.unwrap().attr("hidden").await.unwrap();
        assert!(older_hidden.is_some(), "no more pages: the button is hidden");

        // A task waiting in the queue: the page says what for, and its place.
        let http = crate::helpers::http();
        let call = |method: reqwest::Method, path: &str, body: Option<serde_json::Value>| {
            let mut req = http.request(method, format!("{}{path}", server.base)).bearer_auth(&token);
            if let Some(b) = body {
                req = req.json(&b);
            }
            req.send()
        };
        let ok = |r: reqwest::Response| {
            assert!(r.status().is_success(), "{}", r.status());
            r
        };
        ok(call(reqwest::Method::PUT, "/api/v1/resources/licences/maya", Some(serde_json::json!({ "count": 1 })))
            .await
            .unwrap());
        let app = serde_json::json!({
            "definition": {
                "name": "licensed",
                "phases": [{ "name": "work" }],
                "resources": { "work": { "walltime": "00:10:00", "licences": { "maya": 1 } } },
            },
            "files": { "app_work": "#!/bin/sh\nsleep 60\n", "cluster/local": "true\n" }
        });
        ok(call(reqwest::Method::PUT, "/api/v1/applications/licensed", Some(app)).await.unwrap());
        let body = serde_json::json!({ "application": "licensed", "cluster": "local", "inputs": {} });
        let mut ids = Vec::new();
        for _ in 0..2 {
            let v: serde_json::Value =
                ok(call(reqwest::Method::POST, "/api/v1/tasks", Some(body.clone())).await.unwrap())
                    .json()
                    .await
                    .unwrap();
            ids.push(v["data"]["id"].as_str().unwrap().to_owned());
        }
        until(30, "the second task to wait for the licence", || async {
            let v: serde_json::Value =
                call(reqwest::Method::GET, &format!("/api/v1/tasks/{}", ids[1]), None).await.ok()?.json().await.ok()?;
            v["data"]["queue"]["waiting_for"].is_string().then_some(())
        })
        .await;
        c.find(Locator::Css(&format!("#tasks tbody tr[data-task='{}']", ids[1]))).await.unwrap().click().await.unwrap();
        let said = until(10, "the queue line", || async {
            Some(text_of(&c, "#detail-queue").await).filter(|t| t.contains("in the queue"))
        })
        .await;
        assert_eq!(said, "waits for 1 maya licence: 1 of 1 in use — number 1 in the queue");
        for t in &ids {
            ok(call(reqwest::Method::DELETE, &format!("/api/v1/tasks/{t}"), None).await.unwrap());
        }
        id
    }
    .await;
    c.close().await.unwrap();
    let home = std::env::var("HOME").unwrap();
    let _ = std::fs::remove_dir_all(std::path::Path::new(&home).join("hpcforge-runs").join(result));
}
