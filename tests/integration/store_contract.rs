//! The storage contract, run against the embedded store and MongoDB (SecantusDB, with
//! and without transactions). Every test here runs three times; nextest names each
//! run `store_contract::<store>::<test>`.

use std::collections::BTreeMap;

use hpcforge::auth::{Role, StoredToken, TokenId, TokenInfo, UserAccount};
use hpcforge::definitions::{self, CheckedFile, CheckedUpload, DefinitionKind, UploadLimits, folder};
use hpcforge::model::{AppName, ClusterName, DefinitionRef, Phase, PhaseState, Task, TaskState, UserName};
use hpcforge::store::{Precondition, StoreError, TaskFilter};
use serde_json::json;
use time::OffsetDateTime;

use crate::helpers::{TestStore, repo};

fn admin() -> UserName {
    UserName::parse("admin").unwrap()
}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_790_000_000 + secs).unwrap() + time::Duration::milliseconds(123)
}

/// The real `applications/sleep` example, checked as the server checks uploads.
fn sleep_upload() -> CheckedUpload {
    let loaded = folder::load_application(&repo().join("applications/sleep"), &UploadLimits::default())
        .expect("the example is valid");
    definitions::check_application(loaded.upload, &UploadLimits::default()).expect("checks pass")
}

/// A small application whose execute script says `marker`.
fn app(name: &str, marker: &str) -> CheckedUpload {
    let mut files = BTreeMap::new();
    for phase in ["prolog", "execute", "epilog"] {
        files.insert(format!("app_{phase}"), format!("#!/bin/bash\necho {phase} {marker}\n"));
    }
    let upload = definitions::Upload { definition: toml::from_str(&format!("name = '{name}'")).unwrap(), files };
    definitions::check_application(upload, &UploadLimits::default()).unwrap()
}

fn cluster(name: &str) -> CheckedUpload {
    let upload = definitions::Upload {
        definition: toml::from_str(&format!("name = '{name}'\nscheduler = 'local'")).unwrap(),
        files: BTreeMap::from([("forge/script_common".to_owned(), "#!/bin/bash\n@@ HPCG_PAYLOAD @@\n".to_owned())]),
    };
    definitions::check_cluster(upload, &UploadLimits::default()).unwrap()
}

async fn a_first_push_is_version_1_and_reads_back_exactly(t: TestStore) {
    let upload = sleep_upload();
    let rev = t.store.put_revision(&upload, Precondition::Any, &admin(), at(0)).await.unwrap();
    assert_eq!((rev.version, rev.deleted), (1, false));
    assert_eq!(rev.uploaded_at, at(0), "kept to the millisecond");
    assert_eq!(rev.definition.as_ref(), Some(&upload.definition));
    assert_eq!(t.store.latest_revision(DefinitionKind::Application, "sleep").await.unwrap().as_ref(), Some(&rev));
    assert_eq!(t.store.revision(DefinitionKind::Application, "sleep", 1).await.unwrap().as_ref(), Some(&rev));
    for file in &upload.files {
        let stored =
            t.store.read_file(DefinitionKind::Application, "sleep", 1, &file.path).await.unwrap().expect("stored");
        assert_eq!(stored.text, file.text);
        assert_eq!(stored.meta.sha256, file.sha256);
        assert_eq!(stored.meta.size, file.text.len() as u64);
        assert_eq!(stored.meta.filename, format!("applications/sleep/{}", file.path));
        assert_eq!(stored.uploaded_by, admin());
        assert_eq!(stored.uploaded_at, at(0));
    }
}

async fn blobs_carry_exactly_the_names_in_the_design(t: TestStore) {
    t.store.put_revision(&sleep_upload(), Precondition::Any, &admin(), at(0)).await.unwrap();
    let local_slurm =
        folder::load_cluster(&repo().join("clusters/local-slurm"), None, &UploadLimits::default()).expect("example");
    let checked = definitions::check_cluster(local_slurm.upload, &UploadLimits::default()).unwrap();
    t.store.put_revision(&checked, Precondition::Any, &admin(), at(1)).await.unwrap();
    let names: Vec<String> = t.raw_blobs().await.into_iter().map(|(n, v)| format!("{n}@{v}")).collect();
    assert_eq!(
        names,
        [
            "applications/sleep/app_epilog@1",
            "applications/sleep/app_execute@1",
            "applications/sleep/app_prolog@1",
            "applications/sleep/cluster/local@1",
            "applications/sleep/cluster/local-sge@1",
            "applications/sleep/cluster/local-slurm@1",
            "clusters/local-slurm/forge/script_common@1",
            "clusters/local-slurm/forge/script_epilog@1",
            "clusters/local-slurm/forge/script_execute@1",
            "clusters/local-slurm/forge/script_prolog@1",
        ]
    );
}

async fn a_second_push_is_version_2_and_version_1_stays_readable(t: TestStore) {
    t.store.put_revision(&app("demo", "one"), Precondition::Any, &admin(), at(0)).await.unwrap();
    let v2 = t.store.put_revision(&app("demo", "two"), Precondition::Any, &admin(), at(1)).await.unwrap();
    assert_eq!(v2.version, 2);
    assert!(v2.files.iter().all(|f| f.version == 2));
    let read = |v| {
        let s = t.store.clone();
        async move { s.read_file(DefinitionKind::Application, "demo", v, "app_execute").await.unwrap().unwrap().text }
    };
    assert_eq!(read(1).await, "#!/bin/bash\necho execute one\n");
    assert_eq!(read(2).await, "#!/bin/bash\necho execute two\n");
    assert_eq!(t.store.latest_revision(DefinitionKind::Application, "demo").await.unwrap().unwrap().version, 2);
}

async fn history_lists_every_version_oldest_first(t: TestStore) {
    for (i, m) in ["a", "b", "c"].iter().enumerate() {
        t.store.put_revision(&app("demo", m), Precondition::Any, &admin(), at(i as i64)).await.unwrap();
    }
    let h = t.store.history(DefinitionKind::Application, "demo").await.unwrap();
    assert_eq!(h.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(t.store.history(DefinitionKind::Application, "nothing").await.unwrap().is_empty());
}

async fn list_current_shows_the_newest_live_version_of_each_name(t: TestStore) {
    for (i, (name, m)) in [("zeta", "1"), ("alpha", "1"), ("zeta", "2"), ("gone", "1")].iter().enumerate() {
        t.store.put_revision(&app(name, m), Precondition::Any, &admin(), at(i as i64)).await.unwrap();
    }
    t.store.delete_definition(DefinitionKind::Application, "gone", &admin(), at(9)).await.unwrap().unwrap();
    let list = t.store.list_current(DefinitionKind::Application).await.unwrap();
    let got: Vec<(String, u32)> = list.iter().map(|r| (r.name.clone(), r.version)).collect();
    assert_eq!(got, [("alpha".to_owned(), 1), ("zeta".to_owned(), 2)]);
}

async fn delete_appends_a_tombstone_and_keeps_old_versions_readable(t: TestStore) {
    t.store.put_revision(&app("demo", "one"), Precondition::Any, &admin(), at(0)).await.unwrap();
    let bob = UserName::parse("bob").unwrap();
    let tomb =
        t.store.delete_definition(DefinitionKind::Application, "demo", &bob, at(1)).await.unwrap().expect("deleted");
    assert_eq!(
        (tomb.version, tomb.deleted, tomb.definition.is_none(), tomb.uploaded_by.as_str()),
        (2, true, true, "bob")
    );
    let latest = t.store.latest_revision(DefinitionKind::Application, "demo").await.unwrap().unwrap();
    assert!(latest.deleted);
    let old = t.store.read_file(DefinitionKind::Application, "demo", 1, "app_execute").await.unwrap().unwrap();
    assert_eq!(old.text, "#!/bin/bash\necho execute one\n");
    // Deleting again, or deleting what never existed, finds nothing to delete.
    assert!(t.store.delete_definition(DefinitionKind::Application, "demo", &bob, at(2)).await.unwrap().is_none());
    assert!(t.store.delete_definition(DefinitionKind::Application, "never", &bob, at(2)).await.unwrap().is_none());
}

async fn pushing_after_a_delete_continues_the_version_numbers(t: TestStore) {
    t.store.put_revision(&app("demo", "one"), Precondition::Any, &admin(), at(0)).await.unwrap();
    t.store.delete_definition(DefinitionKind::Application, "demo", &admin(), at(1)).await.unwrap();
    let again = t.store.put_revision(&app("demo", "three"), Precondition::Absent, &admin(), at(2)).await.unwrap();
    assert_eq!(again.version, 3, "version numbers are never reused");
}

async fn create_only_refuses_an_existing_definition(t: TestStore) {
    t.store.put_revision(&app("demo", "one"), Precondition::Absent, &admin(), at(0)).await.unwrap();
    let err = t.store.put_revision(&app("demo", "two"), Precondition::Absent, &admin(), at(1)).await.unwrap_err();
    assert!(matches!(&err, StoreError::Conflict(m) if m.contains("already exists (version 1)")), "{err}");
    assert_eq!(t.store.history(DefinitionKind::Application, "demo").await.unwrap().len(), 1);
    assert_eq!(t.raw_blobs().await.len(), 3, "the refused create stored no blob");
}

async fn applications_and_clusters_are_separate_namespaces(t: TestStore) {
    t.store.put_revision(&app("same", "x"), Precondition::Any, &admin(), at(0)).await.unwrap();
    let c = t.store.put_revision(&cluster("same"), Precondition::Any, &admin(), at(1)).await.unwrap();
    assert_eq!(c.version, 1);
    assert_eq!(c.files[0].filename, "clusters/same/forge/script_common");
    assert_eq!(t.store.list_current(DefinitionKind::Cluster).await.unwrap().len(), 1);
    assert_eq!(t.store.list_current(DefinitionKind::Application).await.unwrap().len(), 1);
}

async fn unknown_names_versions_and_paths_read_as_none(t: TestStore) {
    t.store.put_revision(&app("demo", "x"), Precondition::Any, &admin(), at(0)).await.unwrap();
    let s = &t.store;
    assert!(s.latest_revision(DefinitionKind::Application, "other").await.unwrap().is_none());
    assert!(s.revision(DefinitionKind::Application, "demo", 2).await.unwrap().is_none());
    assert!(s.read_file(DefinitionKind::Application, "demo", 2, "app_execute").await.unwrap().is_none());
    assert!(s.read_file(DefinitionKind::Application, "demo", 1, "app_nothing").await.unwrap().is_none());
    assert!(s.read_file(DefinitionKind::Cluster, "demo", 1, "app_execute").await.unwrap().is_none());
}

async fn concurrent_pushes_of_one_name_get_distinct_versions_and_none_is_lost(t: TestStore) {
    let pushes = (0..8).map(|i| {
        let store = t.store.clone();
        tokio::spawn(async move {
            store.put_revision(&app("busy", &i.to_string()), Precondition::Any, &admin(), at(i)).await
        })
    });
    let mut versions = Vec::new();
    for p in pushes {
        versions.push(p.await.unwrap().expect("every concurrent push is stored").version);
    }
    versions.sort();
    assert_eq!(versions, (1..=8).collect::<Vec<u32>>());
    // Each version holds the content of the push that got it.
    for rev in t.store.history(DefinitionKind::Application, "busy").await.unwrap() {
        let f =
            t.store.read_file(DefinitionKind::Application, "busy", rev.version, "app_execute").await.unwrap().unwrap();
        assert_eq!(f.meta.sha256, rev.files.iter().find(|m| m.path == "app_execute").unwrap().sha256);
    }
    assert_eq!(t.raw_blobs().await.len(), 8 * 3);
}

async fn a_write_that_fails_midway_leaves_nothing_behind(t: TestStore) {
    // Two files with the same path: the first blob is written, the second collides
    // with it. The checks never produce this; it is the simplest way to make a real
    // store fail in the middle of a revision.
    let mut broken = app("half", "x");
    let dup = broken.files[0].clone();
    broken.files.push(CheckedFile { text: "#!/bin/bash\necho other\n".into(), ..dup });
    let err = t.store.put_revision(&broken, Precondition::Any, &admin(), at(0)).await;
    assert!(err.is_err(), "the write must fail");
    assert!(t.store.latest_revision(DefinitionKind::Application, "half").await.unwrap().is_none());
    assert_eq!(t.raw_blobs().await, [], "no blob survives a failed write");
    assert_eq!(t.raw_chunk_count().await, 0, "no GridFS chunk survives a failed write");
    // And the name is still free for a good upload, as version 1.
    let ok = t.store.put_revision(&app("half", "y"), Precondition::Any, &admin(), at(1)).await.unwrap();
    assert_eq!(ok.version, 1);
}

async fn large_and_unicode_scripts_round_trip_byte_for_byte(t: TestStore) {
    // 600 KiB of mixed-width UTF-8: three GridFS chunks, split inside characters.
    let line = "echo 'π ≈ 3.14159 — naïve café 日本語 🚀'\n";
    let mut body = String::from("#!/bin/bash\n");
    while body.len() < 600 * 1024 {
        body.push_str(line);
    }
    let mut upload = app("big", "x");
    let exec = upload.files.iter_mut().find(|f| f.path == "app_execute").unwrap();
    exec.text = body.clone();
    exec.sha256 = definitions::script::sha256_hex(body.as_bytes());
    t.store.put_revision(&upload, Precondition::Any, &admin(), at(0)).await.unwrap();
    let back = t.store.read_file(DefinitionKind::Application, "big", 1, "app_execute").await.unwrap().unwrap();
    assert_eq!(back.text.len(), body.len());
    assert!(back.text == body, "content differs after the round trip");
    if t.mongo.is_some() {
        // 255 KiB GridFS chunks: the big script takes ceil(len / 255 KiB) = 3, the two
        // small scripts one each.
        assert_eq!(body.len().div_ceil(255 * 1024), 3);
        assert_eq!(t.raw_chunk_count().await, 3 + 2, "the big script spans several chunks");
    }
}

fn task(owner: &str, n: u64) -> Task {
    Task::new(
        UserName::parse(owner).unwrap(),
        DefinitionRef { name: AppName::parse("sleep").unwrap(), version: 1 },
        DefinitionRef { name: ClusterName::parse("local-slurm").unwrap(), version: 1 },
        json!([{ "name": "sleep", "type": "int", "value": n }]),
        &hpcforge::model::workflow::PhaseGraph::default_shape(),
        hpcforge::store::to_millis(at(n as i64)),
    )
}

async fn tasks_are_stored_and_listed_by_owner_newest_first(t: TestStore) {
    let mut alice_ids = Vec::new();
    for n in 0..3 {
        let a = task("alice", n);
        t.store.insert_task(&a).await.unwrap();
        alice_ids.push(a.id);
        t.store.insert_task(&task("bob", n)).await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let got = t.store.get_task(&alice_ids[0]).await.unwrap().expect("stored");
    assert_eq!(got, task_with_id(alice_ids[0], "alice", 0));
    let alice = TaskFilter { owner: Some(UserName::parse("alice").unwrap()), ..Default::default() };
    let listed: Vec<_> = t.store.list_tasks(&alice, 10).await.unwrap().into_iter().map(|t| t.id).collect();
    alice_ids.reverse();
    assert_eq!(listed, alice_ids);
    assert_eq!(t.store.list_tasks(&TaskFilter::default(), 4).await.unwrap().len(), 4);
    assert!(t.store.get_task(&hpcforge::model::TaskId::new()).await.unwrap().is_none());
}

fn task_with_id(id: hpcforge::model::TaskId, owner: &str, n: u64) -> Task {
    Task { id, ..task(owner, n) }
}

async fn inserting_a_task_twice_is_a_conflict(t: TestStore) {
    let a = task("alice", 1);
    t.store.insert_task(&a).await.unwrap();
    let err = t.store.insert_task(&a).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
}

/// A task of `owner` for `app` on `cluster` in `state`, created `secs` after the epoch
/// of the test (its ID carries that time, as a real one carries its creation time).
fn task_at(owner: &str, app: &str, cluster: &str, state: TaskState, millis: u64) -> Task {
    let mut t = Task::new(
        UserName::parse(owner).unwrap(),
        DefinitionRef { name: AppName::parse(app).unwrap(), version: 1 },
        DefinitionRef { name: ClusterName::parse(cluster).unwrap(), version: 1 },
        json!([]),
        &hpcforge::model::workflow::PhaseGraph::default_shape(),
        hpcforge::store::to_millis(at(0)),
    );
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        1_800_000_000 + millis / 1000,
        ((millis % 1000) * 1_000_000) as u32,
    );
    t.id = hpcforge::model::TaskId::parse(&uuid::Uuid::new_v7(ts).to_string()).unwrap();
    t.state = state;
    t
}

async fn task_lists_filter_by_owner_state_application_cluster_time_and_page_by_id(t: TestStore) {
    use TaskState::*;
    let all = [
        task_at("alice", "sleep", "local", Completed, 1_000),
        task_at("alice", "pi", "local", Running, 2_000),
        task_at("alice", "sleep", "local-slurm", Failed, 3_000),
        task_at("bob", "sleep", "local", Running, 4_000),
        task_at("alice", "sleep", "local", Pending, 5_000),
    ];
    for task in &all {
        t.store.insert_task(task).await.unwrap();
    }
    let ids = |tasks: Vec<Task>| tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let f =
        |owner: Option<&str>| TaskFilter { owner: owner.map(|o| UserName::parse(o).unwrap()), ..Default::default() };
    assert_eq!(
        ids(t.store.list_tasks(&f(None), 10).await.unwrap()),
        [all[4].id, all[3].id, all[2].id, all[1].id, all[0].id]
    );
    let running = TaskFilter { states: vec![Running, Pending], ..f(Some("alice")) };
    assert_eq!(ids(t.store.list_tasks(&running, 10).await.unwrap()), [all[4].id, all[1].id]);
    let sleep_local = TaskFilter {
        application: Some(AppName::parse("sleep").unwrap()),
        cluster: Some(ClusterName::parse("local").unwrap()),
        ..f(None)
    };
    assert_eq!(ids(t.store.list_tasks(&sleep_local, 10).await.unwrap()), [all[4].id, all[3].id, all[0].id]);
    // `since` is inclusive, to the millisecond of the ID.
    let since = TaskFilter {
        since: Some(
            time::OffsetDateTime::from_unix_timestamp_nanos((1_800_000_000_000i128 + 3_000) * 1_000_000).unwrap(),
        ),
        ..f(None)
    };
    assert_eq!(ids(t.store.list_tasks(&since, 10).await.unwrap()), [all[4].id, all[3].id, all[2].id]);
    // Pages: before the last ID of the previous page.
    let page1 = ids(t.store.list_tasks(&f(Some("alice")), 2).await.unwrap());
    assert_eq!(page1, [all[4].id, all[2].id]);
    let next = TaskFilter { before: Some(page1[1]), ..f(Some("alice")) };
    assert_eq!(ids(t.store.list_tasks(&next, 2).await.unwrap()), [all[1].id, all[0].id]);
    let last = TaskFilter { before: Some(all[0].id), ..f(Some("alice")) };
    assert!(t.store.list_tasks(&last, 2).await.unwrap().is_empty());
}

async fn task_state_changes_show_in_filters_and_counts(t: TestStore) {
    let mut a = task("alice", 1);
    t.store.insert_task(&a).await.unwrap();
    t.store.insert_task(&task("bob", 2)).await.unwrap();
    let counts = t.store.count_tasks().await.unwrap();
    assert_eq!(counts, [(TaskState::Submitting, 2)]);
    let before = a.clone();
    a.state = TaskState::Completed;
    t.store.update_task(&before, &a).await.unwrap();
    let mut counts = t.store.count_tasks().await.unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(counts, [(TaskState::Completed, 1), (TaskState::Submitting, 1)]);
    let done = TaskFilter { states: vec![TaskState::Completed], ..Default::default() };
    assert_eq!(t.store.list_tasks(&done, 10).await.unwrap().len(), 1);
}

fn account(name: &str, role: Role) -> UserAccount {
    UserAccount {
        name: UserName::parse(name).unwrap(),
        role,
        created_by: admin(),
        created_at: at(5),
        disabled_at: None,
    }
}

fn token_info(user: &str, secs: i64) -> TokenInfo {
    TokenInfo {
        id: TokenId::new(),
        user: UserName::parse(user).unwrap(),
        label: "laptop".into(),
        hint: "hpcf_AbCd…".into(),
        created_by: admin(),
        created_at: at(secs),
        expires_at: at(secs + 3600),
        revoked_at: None,
        last_used_at: None,
    }
}

async fn accounts_are_unique_by_name_and_read_back_exactly(t: TestStore) {
    let alice = account("alice", Role::User);
    t.store.insert_account(&alice).await.unwrap();
    t.store.insert_account(&account("gateway", Role::Portal)).await.unwrap();
    let err = t.store.insert_account(&account("alice", Role::Admin)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(t.store.get_account(&alice.name).await.unwrap(), Some(alice.clone()));
    assert!(t.store.get_account(&UserName::parse("nobody").unwrap()).await.unwrap().is_none());
    let names: Vec<String> = t.store.list_accounts().await.unwrap().into_iter().map(|a| a.name.to_string()).collect();
    assert_eq!(names, ["alice", "gateway"]);
}

async fn tokens_are_found_by_hash_only_and_revocation_sticks(t: TestStore) {
    t.store.insert_account(&account("alice", Role::User)).await.unwrap();
    let first = token_info("alice", 10);
    let second = token_info("alice", 20);
    t.store.insert_token(&StoredToken { info: first.clone(), hash: "aa".repeat(32) }).await.unwrap();
    t.store.insert_token(&StoredToken { info: second.clone(), hash: "bb".repeat(32) }).await.unwrap();
    let dup = StoredToken { info: token_info("alice", 30), hash: "aa".repeat(32) };
    assert!(matches!(t.store.insert_token(&dup).await.unwrap_err(), StoreError::Conflict(_)));
    assert_eq!(t.store.token_by_hash(&"aa".repeat(32)).await.unwrap(), Some(first.clone()));
    assert!(t.store.token_by_hash(&"cc".repeat(32)).await.unwrap().is_none());
    assert_eq!(t.store.list_tokens(&first.user).await.unwrap(), [first.clone(), second.clone()]);
    t.store.touch_token(&first.id, at(50)).await.unwrap();
    assert_eq!(t.store.token_by_hash(&"aa".repeat(32)).await.unwrap().unwrap().last_used_at, Some(at(50)));

    let revoked = t.store.revoke_token(&first.user, &first.id, at(60)).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(at(60)));
    let again = t.store.revoke_token(&first.user, &first.id, at(70)).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(at(60)), "the first revocation time stays");
    // Someone else's token ID does not revoke anything.
    assert!(t.store.revoke_token(&UserName::parse("bob").unwrap(), &second.id, at(80)).await.unwrap().is_none());
    assert_eq!(t.store.token_by_hash(&"bb".repeat(32)).await.unwrap().unwrap().revoked_at, None);
}

async fn disabling_an_account_revokes_all_its_tokens(t: TestStore) {
    t.store.insert_account(&account("alice", Role::User)).await.unwrap();
    t.store.insert_account(&account("bob", Role::User)).await.unwrap();
    let a = token_info("alice", 10);
    let b = token_info("bob", 10);
    t.store.insert_token(&StoredToken { info: a.clone(), hash: "aa".repeat(32) }).await.unwrap();
    t.store.insert_token(&StoredToken { info: b.clone(), hash: "bb".repeat(32) }).await.unwrap();
    let disabled = t.store.disable_account(&a.user, at(100)).await.unwrap().unwrap();
    assert_eq!(disabled.disabled_at, Some(at(100)));
    assert_eq!(t.store.token_by_hash(&"aa".repeat(32)).await.unwrap().unwrap().revoked_at, Some(at(100)));
    assert_eq!(t.store.token_by_hash(&"bb".repeat(32)).await.unwrap().unwrap().revoked_at, None);
    let twice = t.store.disable_account(&a.user, at(200)).await.unwrap().unwrap();
    assert_eq!(twice.disabled_at, Some(at(100)));
    assert!(t.store.disable_account(&UserName::parse("nobody").unwrap(), at(1)).await.unwrap().is_none());
}

/// A task with a history: created, then its prolog queued.
fn task_with_history(owner: &str, n: u64) -> Task {
    let mut a = task(owner, n);
    let when = a.created_at;
    a.record(when, None, "created");
    a.phase_mut(Phase::PROLOG).job_id = Some("41".into());
    a.set_phase_state(when, Phase::PROLOG, PhaseState::Pending, Some("job 41"));
    a
}

async fn a_tasks_state_leaves_out_its_inputs_and_history_but_keeps_its_newest_event(t: TestStore) {
    let a = task_with_history("alice", 1);
    t.store.insert_task(&a).await.unwrap();
    let state = t.store.task_state(&a.id).await.unwrap().expect("stored");
    assert_eq!(state.inputs, serde_json::Value::Null);
    assert_eq!(state.events, [a.events.last().unwrap().clone()], "only the newest event");
    assert_eq!(Task { inputs: a.inputs.clone(), events: a.events.clone(), ..state.clone() }, a);
    let live = t.store.live_tasks().await.unwrap();
    assert_eq!(live, std::slice::from_ref(&state), "live tasks are read as states");
    let listed = t.store.list_tasks(&TaskFilter::default(), 10).await.unwrap();
    assert_eq!(listed, [state]);
    assert!(t.store.task_state(&hpcforge::model::TaskId::new()).await.unwrap().is_none());
}

async fn an_update_from_a_state_writes_the_change_and_appends_the_events(t: TestStore) {
    let a = task_with_history("alice", 1);
    t.store.insert_task(&a).await.unwrap();
    let before = t.store.task_state(&a.id).await.unwrap().unwrap();
    let mut after = before.clone();
    let when = after.created_at;
    after.set_phase_state(when, Phase::PROLOG, PhaseState::Running, Some("job 41"));
    after.set_phase_state(when, Phase::PROLOG, PhaseState::Completed, Some("job 41, exit code 0"));
    after.phase_mut(Phase::PROLOG).exit_code = Some(0);
    let stored = t.store.update_task(&before, &after).await.unwrap();
    assert_eq!(stored.revision, before.revision + 1);
    // The whole task: inputs untouched, every event there once, in order.
    let whole = t.store.get_task(&a.id).await.unwrap().unwrap();
    assert_eq!(whole.inputs, a.inputs, "an update from a state must not lose the inputs");
    let seqs: Vec<u64> = whole.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=a.events.len() as u64 + 2).collect::<Vec<_>>());
    assert_eq!(whole.phase(Phase::PROLOG).exit_code, Some(0));
    assert_eq!(whole.revision, stored.revision);
    let newer: Vec<String> =
        t.store.task_events(&a.id, a.events.len() as u64).await.unwrap().into_iter().map(|e| e.message).collect();
    assert_eq!(newer, ["prolog: pending → running (job 41)", "prolog: running → completed (job 41, exit code 0)"]);
    // A field that is gone is gone (a reason cleared).
    let mut with_reason = t.store.task_state(&a.id).await.unwrap().unwrap();
    let base = with_reason.clone();
    with_reason.phase_mut(Phase::EXECUTE).reason = Some("Resources".into());
    let stored = t.store.update_task(&base, &with_reason).await.unwrap();
    let mut cleared = stored.clone();
    cleared.phase_mut(Phase::EXECUTE).reason = None;
    cleared.retry_at = None;
    t.store.update_task(&stored, &cleared).await.unwrap();
    let read = t.store.task_state(&a.id).await.unwrap().unwrap();
    assert_eq!(read.phase(Phase::EXECUTE).reason, None);
}

async fn an_update_from_a_stale_copy_is_a_conflict_and_changes_nothing(t: TestStore) {
    let a = task_with_history("alice", 1);
    t.store.insert_task(&a).await.unwrap();
    let before = t.store.task_state(&a.id).await.unwrap().unwrap();
    let mut first = before.clone();
    first.cancel_requested = true;
    t.store.update_task(&before, &first).await.unwrap();
    let mut late = before.clone();
    late.record(late.created_at, None, "too late");
    let err = t.store.update_task(&before, &late).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let whole = t.store.get_task(&a.id).await.unwrap().unwrap();
    assert!(whole.cancel_requested);
    assert!(whole.events.iter().all(|e| e.message != "too late"), "the loser's events are not written");
}

async fn creating_a_task_stores_it_and_its_scripts_as_version_1(t: TestStore) {
    let mut a = task_with_history("alice", 1);
    let forged = hpcforge::model::Forged {
        application: a.application.clone(),
        cluster: a.cluster.clone(),
        run_dir: "/home/alice/hpcforge/x".into(),
        scripts: Phase::DEFAULT
            .into_iter()
            .map(|p| {
                let text = format!("#!/bin/sh\necho {p}\n");
                hpcforge::model::ForgedScript {
                    phase: p,
                    sha256: hpcforge::definitions::script::sha256_hex(text.as_bytes()),
                    text,
                }
            })
            .collect(),
    };
    a.scripts_version = 1;
    t.store.create_task(&a, &forged).await.unwrap();
    assert_eq!(t.store.get_task(&a.id).await.unwrap().unwrap(), a);
    for p in Phase::DEFAULT {
        let s = t.store.read_task_script(&a.id, p, Some(1)).await.unwrap().expect("stored with the task");
        assert_eq!((s.version, s.text), (1, format!("#!/bin/sh\necho {p}\n")));
    }
    // A task ID is created once.
    let err = t.store.create_task(&a, &forged).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(t.store.list_tasks(&TaskFilter::default(), 10).await.unwrap().len(), 1);
}

async fn the_store_answers_ping(t: TestStore) {
    t.store.ping().await.unwrap();
}

async fn leases_are_taken_renewed_refused_to_others_taken_over_after_expiry_and_released(t: TestStore) {
    let key = "submit/0190d5a8-0000-7000-8000-000000000001";
    let a = t.store.claim_lease(key, "replica-a", at(15), at(0)).await.unwrap().expect("a free key is taken");
    assert_eq!((a.holder.as_str(), a.fence, a.expires_at), ("replica-a", 1, at(15)));
    let renewed = t.store.claim_lease(key, "replica-a", at(25), at(10)).await.unwrap().expect("renewed");
    assert_eq!((renewed.fence, renewed.expires_at), (1, at(25)), "a renewal keeps the fence");
    assert_eq!(t.store.claim_lease(key, "replica-b", at(30), at(20)).await.unwrap(), None, "b waits while a holds it");
    let b = t.store.claim_lease(key, "replica-b", at(40), at(25)).await.unwrap().expect("lapsed at its time");
    assert_eq!((b.holder.as_str(), b.fence), ("replica-b", 2));
    assert_eq!(t.store.claim_lease(key, "replica-a", at(45), at(30)).await.unwrap(), None, "a lost it");
    assert!(!t.store.release_lease(&renewed, at(31)).await.unwrap(), "a cannot release what b holds");
    assert!(t.store.release_lease(&b, at(31)).await.unwrap());
    assert!(!t.store.release_lease(&b, at(32)).await.unwrap(), "released once");
    let again = t.store.claim_lease(key, "replica-a", at(50), at(32)).await.unwrap().expect("free after release");
    assert_eq!(again.fence, 3, "the fence never goes down, even across a release");
    t.store.claim_lease("watch/local-slurm/alice", "replica-b", at(50), at(32)).await.unwrap().unwrap();
    t.store.claim_lease("watch/local-slurm/bob", "replica-a", at(50), at(32)).await.unwrap().unwrap();
    let watched = t.store.leases("watch/").await.unwrap();
    let keys: Vec<(&str, &str)> = watched.iter().map(|l| (l.key.as_str(), l.holder.as_str())).collect();
    assert_eq!(keys, [("watch/local-slurm/alice", "replica-b"), ("watch/local-slurm/bob", "replica-a")]);
    assert_eq!(t.store.leases("").await.unwrap().len(), 3);
    assert_eq!(t.store.leases("submit/").await.unwrap(), vec![again]);
}

async fn of_servers_claiming_one_key_at_once_exactly_one_wins(t: TestStore) {
    for round in 0..3 {
        let key = format!("submit/race-{round}");
        // The first claim (nobody holds it), then a takeover race once it lapsed.
        for (now, until) in [(at(0), at(10)), (at(20), at(30))] {
            let claims = (0..8).map(|i| {
                let store = t.store.clone();
                let key = key.clone();
                tokio::spawn(async move { store.claim_lease(&key, &format!("replica-{i}"), until, now).await.unwrap() })
            });
            let won: Vec<_> = futures::future::join_all(claims).await.into_iter().filter_map(|r| r.unwrap()).collect();
            assert_eq!(won.len(), 1, "exactly one winner: {won:?}");
            let held = t.store.leases(&key).await.unwrap();
            assert_eq!(held, won, "the store agrees with the winner");
        }
    }
}

fn need(pool: &str, amount: u32, phase: Option<&str>, count: Option<u32>) -> hpcforge::model::queue::Need {
    hpcforge::model::queue::Need {
        pool: pool.into(),
        amount,
        phase: phase.map(|p| hpcforge::model::Phase::parse(p).unwrap()),
        count,
    }
}

async fn pools_grant_what_fits_once_give_back_all_or_nothing_and_note_who_released_by_hand(t: TestStore) {
    use hpcforge::store::pools;
    let alice = UserName::parse("alice").unwrap();
    let s = t.store.as_ref();
    let maya = pools::set_count(s, "licence/maya", 3, "root", at(0)).await.unwrap();
    assert_eq!((maya.count, maya.holders.len()), (3, 0));
    let (a, b) = (hpcforge::model::TaskId::new(), hpcforge::model::TaskId::new());
    let two = [need("licence/maya", 2, Some("execute"), None), need("jobs/c/alice", 1, Some("execute"), Some(10))];
    pools::claim(s, &a, &alice, &two, at(1)).await.unwrap().expect("fits");
    pools::claim(s, &a, &alice, &two, at(2))
        .await
        .unwrap()
        .expect("held already: granted again without counting twice");
    assert_eq!(s.pool("licence/maya").await.unwrap().unwrap().in_use(), 2);
    // b fits the user's pool but not maya: nothing of it is held afterwards.
    let short = pools::claim(s, &b, &alice, &two, at(3)).await.unwrap().unwrap_err();
    assert_eq!(short.describe(), "2 maya licences: 2 of 3 in use");
    let jobs = s.pool("jobs/c/alice").await.unwrap().expect("made from the cluster's count");
    assert_eq!((jobs.count, jobs.holders.len()), (10, 1), "b's grant was given back: {jobs:?}");
    // A site-wide pool nobody set is short of everything.
    let none = pools::claim(s, &b, &alice, &[need("licence/nope", 1, None, None)], at(3)).await.unwrap().unwrap_err();
    assert_eq!(none.count, 0);
    assert_eq!(
        pools::release(s, "licence/maya", &a, Some(hpcforge::model::Phase::EXECUTE)).await.unwrap().map(|h| h.amount),
        Some(2)
    );
    assert_eq!(pools::release(s, "licence/maya", &a, Some(hpcforge::model::Phase::EXECUTE)).await.unwrap(), None);
    pools::claim(s, &b, &alice, &two, at(4)).await.unwrap().expect("free again");
    let gone = pools::release_by_hand(s, "licence/maya", &b, None, "root", at(5)).await.unwrap();
    assert_eq!(gone.len(), 1);
    let maya = s.pool("licence/maya").await.unwrap().unwrap();
    assert_eq!(maya.in_use(), 0);
    assert!(maya.notes.iter().any(|n| n.by == "root" && n.message.contains("by hand")), "{:?}", maya.notes);
    let keys: Vec<String> = s.pools().await.unwrap().into_iter().map(|p| p.key).collect();
    assert_eq!(keys, ["jobs/c/alice", "licence/maya"]);
}

async fn of_tasks_claiming_one_pool_at_once_never_more_than_it_has_are_granted(t: TestStore) {
    use hpcforge::store::pools;
    let s = t.store.clone();
    pools::set_count(s.as_ref(), "licence/race", 5, "root", at(0)).await.unwrap();
    let claims = (0..24).map(|i| {
        let s = s.clone();
        tokio::spawn(async move {
            let owner = UserName::parse(if i % 2 == 0 { "alice" } else { "bob" }).unwrap();
            let task = hpcforge::model::TaskId::new();
            let needs =
                [need("licence/race", 1, Some("execute"), None), need(&format!("tasks/c/{owner}"), 1, None, Some(4))];
            pools::claim(s.as_ref(), &task, &owner, &needs, at(1)).await.unwrap().is_ok()
        })
    });
    let granted = futures::future::join_all(claims).await.into_iter().filter(|r| *r.as_ref().unwrap()).count();
    // Never more than the pool has. (Fewer is possible: a task may be refused while
    // another holds a licence it then gives back for want of a live-task slot.)
    assert!((1..=5).contains(&granted), "{granted} granted of 5");
    let pool = s.pool("licence/race").await.unwrap().unwrap();
    assert_eq!(pool.in_use() as usize, granted, "the store agrees with the grants: {pool:?}");
    let mut users = 0;
    for u in ["alice", "bob"] {
        users += s.pool(&format!("tasks/c/{u}")).await.unwrap().map_or(0, |p| p.in_use());
    }
    assert_eq!(users as usize, granted, "each granted task holds one live-task slot, the others gave theirs back");
}

/// Writes `bytes` as the kept output `path` of `task`, in store-sized chunks.
async fn keep(s: &dyn hpcforge::store::Store, task: &hpcforge::model::TaskId, path: &str, bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let handle = s.archive_begin(task, path, at(1)).await.unwrap();
    for (n, chunk) in bytes.chunks(hpcforge::store::ARCHIVE_CHUNK).enumerate() {
        s.archive_chunk(&handle, n as u32, chunk.to_vec()).await.unwrap();
    }
    let file = hpcforge::model::archive::ArchivedFile {
        path: path.into(),
        size: bytes.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(bytes)),
        modified: at(0),
    };
    s.archive_finish(&handle, task, &file, &UserName::parse("alice").unwrap(), at(2)).await.unwrap();
    handle
}

async fn read_kept(
    s: &dyn hpcforge::store::Store,
    task: &hpcforge::model::TaskId,
    path: &str,
    a: u64,
    b: u64,
) -> Vec<u8> {
    use futures::TryStreamExt as _;
    let (_, chunks) = s.archive_read(task, path, a, b).await.unwrap().expect("kept");
    chunks.try_concat().await.unwrap()
}

async fn kept_outputs_read_back_whole_or_in_part_only_once_finished_and_go_with_their_task(t: TestStore) {
    let s = t.store.as_ref();
    let (task, other) = (hpcforge::model::TaskId::new(), hpcforge::model::TaskId::new());
    // Three chunks and a bit, bytes that differ chunk to chunk.
    let big: Vec<u8> = (0..(3 * hpcforge::store::ARCHIVE_CHUNK + 1234)).map(|i| (i * 7 + i / 997) as u8).collect();
    keep(s, &task, "out/big.bin", &big).await;
    keep(s, &task, "out/empty", b"").await;
    keep(s, &other, "out/big.bin", b"another task's").await;
    // One being written is seen by nobody.
    let unfinished = s.archive_begin(&task, "out/half", at(3)).await.unwrap();
    s.archive_chunk(&unfinished, 0, vec![1; 10]).await.unwrap();
    assert!(s.archived_file(&task, "out/half").await.unwrap().is_none());
    assert!(s.archive_read(&task, "out/half", 0, 9).await.unwrap().is_none());

    let listed = s.archived_files(&task).await.unwrap();
    let paths: Vec<&str> = listed.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["out/big.bin", "out/empty"]);
    assert_eq!(listed[0].size, big.len() as u64);
    use sha2::Digest as _;
    assert_eq!(listed[0].sha256, hex::encode(sha2::Sha256::digest(&big)));
    assert_eq!(listed[0].modified, at(0));
    assert_eq!(s.archived_file(&task, "out/big.bin").await.unwrap().as_ref(), Some(&listed[0]));

    assert_eq!(read_kept(s, &task, "out/big.bin", 0, big.len() as u64 - 1).await, big, "whole");
    let c = hpcforge::store::ARCHIVE_CHUNK as u64;
    for (a, b) in [(0, 0), (5, 99), (c - 3, c + 2), (c, 2 * c - 1), (2 * c + 17, big.len() as u64 - 1)] {
        assert_eq!(read_kept(s, &task, "out/big.bin", a, b).await, big[a as usize..=b as usize], "{a}-{b}");
    }
    assert_eq!(read_kept(s, &other, "out/big.bin", 0, 13).await, b"another task's");

    // Dropping a task's archive takes its files, finished or not, and only its.
    assert_eq!(s.archive_drop(&task).await.unwrap(), 3);
    assert!(s.archived_files(&task).await.unwrap().is_empty());
    assert!(s.archive_read(&task, "out/big.bin", 0, 1).await.unwrap().is_none());
    assert_eq!(s.archived_files(&other).await.unwrap().len(), 1);
    // A file whose writing was dropped cannot be finished afterwards.
    let file = hpcforge::model::archive::ArchivedFile {
        path: "out/half".into(),
        size: 10,
        sha256: "x".into(),
        modified: at(0),
    };
    assert!(s.archive_finish(&unfinished, &task, &file, &UserName::parse("alice").unwrap(), at(4)).await.is_err());
    assert!(s.archived_files(&task).await.unwrap().is_empty());

    // In MongoDB they are standard GridFS files under the design's names.
    if let Some(db) = &t.mongo {
        use futures::AsyncReadExt as _;
        let bucket = db.gridfs_bucket(None);
        let mut stream =
            bucket.open_download_stream_by_name(format!("tasks/{other}/outputs/out/big.bin")).await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"another task's");
        let doc = db
            .collection::<::mongodb::bson::Document>("fs.files")
            .find_one(::mongodb::bson::doc! { "filename": format!("tasks/{other}/outputs/out/big.bin") })
            .await
            .unwrap()
            .unwrap();
        let meta = doc.get_document("metadata").unwrap();
        assert_eq!(meta.get_str("uploaded_by").unwrap(), "alice");
        assert_eq!(meta.get_str("sha256").unwrap(), hex::encode(sha2::Sha256::digest(b"another task's")));
    }
}

async fn a_kept_file_missing_a_chunk_breaks_the_read_instead_of_coming_short(t: TestStore) {
    use futures::StreamExt as _;
    let s = t.store.as_ref();
    let task = hpcforge::model::TaskId::new();
    let c = hpcforge::store::ARCHIVE_CHUNK;
    let handle = s.archive_begin(&task, "gappy", at(1)).await.unwrap();
    s.archive_chunk(&handle, 0, vec![1; c]).await.unwrap();
    s.archive_chunk(&handle, 2, vec![3; 10]).await.unwrap();
    let file = hpcforge::model::archive::ArchivedFile {
        path: "gappy".into(),
        size: (2 * c + 10) as u64,
        sha256: "x".into(),
        modified: at(0),
    };
    s.archive_finish(&handle, &task, &file, &UserName::parse("alice").unwrap(), at(2)).await.unwrap();
    let (_, mut chunks) = s.archive_read(&task, "gappy", 0, file.size - 1).await.unwrap().unwrap();
    assert_eq!(chunks.next().await.unwrap().unwrap().len(), c);
    let err = chunks.next().await.expect("an error, not the end").unwrap_err();
    assert!(err.to_string().contains("chunk 1"), "{err}");
    assert!(chunks.next().await.is_none());
}

crate::for_each_store!(
    a_first_push_is_version_1_and_reads_back_exactly,
    blobs_carry_exactly_the_names_in_the_design,
    a_second_push_is_version_2_and_version_1_stays_readable,
    history_lists_every_version_oldest_first,
    list_current_shows_the_newest_live_version_of_each_name,
    delete_appends_a_tombstone_and_keeps_old_versions_readable,
    pushing_after_a_delete_continues_the_version_numbers,
    create_only_refuses_an_existing_definition,
    applications_and_clusters_are_separate_namespaces,
    unknown_names_versions_and_paths_read_as_none,
    concurrent_pushes_of_one_name_get_distinct_versions_and_none_is_lost,
    a_write_that_fails_midway_leaves_nothing_behind,
    large_and_unicode_scripts_round_trip_byte_for_byte,
    tasks_are_stored_and_listed_by_owner_newest_first,
    inserting_a_task_twice_is_a_conflict,
    task_lists_filter_by_owner_state_application_cluster_time_and_page_by_id,
    task_state_changes_show_in_filters_and_counts,
    accounts_are_unique_by_name_and_read_back_exactly,
    tokens_are_found_by_hash_only_and_revocation_sticks,
    disabling_an_account_revokes_all_its_tokens,
    the_store_answers_ping,
    a_tasks_state_leaves_out_its_inputs_and_history_but_keeps_its_newest_event,
    an_update_from_a_state_writes_the_change_and_appends_the_events,
    an_update_from_a_stale_copy_is_a_conflict_and_changes_nothing,
    creating_a_task_stores_it_and_its_scripts_as_version_1,
    leases_are_taken_renewed_refused_to_others_taken_over_after_expiry_and_released,
    of_servers_claiming_one_key_at_once_exactly_one_wins,
    pools_grant_what_fits_once_give_back_all_or_nothing_and_note_who_released_by_hand,
    of_tasks_claiming_one_pool_at_once_never_more_than_it_has_are_granted,
    kept_outputs_read_back_whole_or_in_part_only_once_finished_and_go_with_their_task,
    a_kept_file_missing_a_chunk_breaks_the_read_instead_of_coming_short,
);
