//! File inputs: what a schema cannot check about a file entry (an absolute, plain
//! path; the server it lives on is the task's cluster; its mode; a unique name in the
//! run directory), and the typed file to stage it becomes.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::model::application::check_absolute_path;
use crate::model::{ClusterSpec, FileAction, FileMode, Problems, StagedFile};

/// Checks one entry of a `file` input (`ep` is where it stands in the task body);
/// the file to stage, or `None` with the problem pushed. A mode that would lock the
/// owner out is raised, and `notes` says so.
pub(super) fn stage_file(
    e: &Value,
    ep: &dyn Fn() -> String,
    cluster: &ClusterSpec,
    staged_names: &mut BTreeSet<String>,
    p: &mut Problems,
    notes: &mut Vec<String>,
) -> Option<StagedFile> {
    let path = e["path"].as_str().unwrap_or_default();
    if let Err(why) = check_absolute_path(path) {
        p.push_rule(format!("{}/path", ep()), "path", Some("string"), why.replace(path, "the path"));
        return None;
    }
    // A portal names a server by its own ID (a cluster lists those in
    // `portal_ids`) and carries its name beside it: either one that
    // names the task's cluster will do.
    if let Some(server) = e.get("server") {
        let id = server.get("id").and_then(Value::as_str).unwrap_or_default();
        let name = server.get("name").and_then(Value::as_str);
        if !cluster.is_known_as(id) && !name.is_some_and(|n| cluster.is_known_as(n)) {
            let named = name.map(|n| format!(" (`{}`)", n.escape_debug())).unwrap_or_default();
            p.push_rule(
                    format!("{}/server/id", ep()),
                    "server",
                    Some("string"),
                    format!(
                        "the file is on `{}`{named} but the task runs on `{}`; only files on the task's cluster can be copied \
                         (a cluster lists the IDs portals know it by in `portal_ids`)",
                        id.escape_debug(),
                        cluster.name
                    ),
                );
            return None;
        }
    }
    let mode = match e.get("mods").and_then(Value::as_str).map(FileMode::parse) {
        None => None,
        Some(Ok(m)) => Some(m),
        Some(Err(why)) => {
            p.push_rule(format!("{}/mods", ep()), "mods", Some("string"), why);
            return None;
        }
    };
    let base = path.rsplit('/').next().unwrap_or_default().to_owned();
    if base.is_empty() {
        p.push_rule(format!("{}/path", ep()), "path", Some("string"), "the path names a directory, not a file");
        return None;
    }
    if base.starts_with(".hpcforge") || !staged_names.insert(base.clone()) {
        p.push_rule(
            format!("{}/path", ep()),
            "staging",
            Some("string"),
            "another file would be staged under the same name in the run directory",
        );
        return None;
    }
    // The job runs as the owner: a copy it cannot read would lock it
    // out of its own input, so the owner keeps read, and the task
    // says so.
    let mode = mode.map(|m| {
        let applied = m.readable_by_owner();
        if applied != m {
            notes.push(format!(
                "input file `{base}`: the mode {} would leave its owner unable to read it; \
                     the copy gets {} ({applied})",
                m.symbolic(),
                applied.symbolic()
            ));
        }
        applied
    });
    Some(StagedFile { action: FileAction::Copy, source: path.to_owned(), name: base, mode })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::tests::{cluster, pointers, sleep};
    use crate::model::ClusterSpec;

    #[test]
    fn staged_files_come_from_the_validated_inputs_typed() {
        // (Was: staged files come from the recorded inputs. They are now kept typed on
        // the task, straight from validation.)
        let files = sleep().validate(&json!([]), &cluster()).unwrap().staged();
        assert_eq!(files.len(), 1);
        assert_eq!((files[0].name.as_str(), files[0].mode.map(|m| m.to_string())), ("hostname", Some("0644".into())));
        assert_eq!(files[0].source, "/etc/hostname");
    }

    #[test]
    fn modes_come_octal_or_as_ls_shows_them_and_the_owner_keeps_read() {
        let body = |mods: &str| json!([{ "name": "input_files", "files": [{ "action": "COPY", "path": "/data/in.dat", "mods": mods }] }]);
        let mode_of = |mods: &str| {
            let v = sleep().validate(&body(mods), &cluster()).unwrap();
            (v.staged()[0].mode.unwrap().to_string(), v.notes.len())
        };
        assert_eq!(mode_of("0644"), ("0644".into(), 0));
        assert_eq!(mode_of("640"), ("0640".into(), 0));
        assert_eq!(mode_of("-rw-r--r--"), ("0644".into(), 0));
        assert_eq!(mode_of("-rwxr-x---"), ("0750".into(), 0));
        assert_eq!(mode_of("-rwsr-xr-t"), ("0755".into(), 0), "special bits are not given to a copy");
        // A mode that locks the owner out is not applied silently: read is kept, and said.
        let v = sleep().validate(&body("----------"), &cluster()).unwrap();
        assert_eq!(v.staged()[0].mode.unwrap().to_string(), "0400");
        assert!(
            v.notes[0].contains("`in.dat`") && v.notes[0].contains("----------") && v.notes[0].contains("-r--------"),
            "{:?}",
            v.notes
        );
        for bad in ["drwxr-xr-x", "-rw-r--r-x-", "0999", "rw-r--r--", "-rwqr--r--"] {
            let p = sleep().validate(&body(bad), &cluster()).unwrap_err();
            assert_eq!(
                pointers(&p),
                [("/inputs/0/files/0/mods".to_owned(), p.iter().next().unwrap().rule.clone().unwrap())],
                "{bad}: {p}"
            );
        }
        let p = sleep().validate(&body("drwxr-xr-x"), &cluster()).unwrap_err();
        assert!(p.to_string().contains("directory"), "{p}");
    }

    #[test]
    fn a_file_is_on_the_tasks_cluster_by_its_portal_id_or_its_name() {
        let rnd01: ClusterSpec =
            toml::from_str("name = 'rnd01'\nscheduler = 'local'\nportal_ids = ['59b1302f6eea4a7e979b2c56']").unwrap();
        let entry = |server: Value| json!([{ "name": "input_files", "files": [{ "action": "COPY", "path": "/home/hpcgadmin/test", "server": server }] }]);
        for server in [
            json!({ "id": "59b1302f6eea4a7e979b2c56", "name": "rnd01" }),
            json!({ "id": "59b1302f6eea4a7e979b2c56" }),
            json!({ "id": "5a0000000000000000000000", "name": "rnd01" }),
            json!({ "id": "rnd01" }),
        ] {
            sleep().validate(&entry(server.clone()), &rnd01).unwrap_or_else(|p| panic!("{server}: {p}"));
        }
        let p =
            sleep().validate(&entry(json!({ "id": "5a0000000000000000000000", "name": "rnd02" })), &rnd01).unwrap_err();
        assert_eq!(pointers(&p), [("/inputs/0/files/0/server/id".into(), "server".into())]);
        assert!(p.to_string().contains("`rnd02`") && p.to_string().contains("portal_ids"), "{p}");
    }

    #[test]
    fn file_entries_are_checked_for_action_path_server_and_staging() {
        let body = json!([{ "name": "input_files", "files": [
            { "action": "COPY", "path": "/home/alice/a.dat", "server": { "id": "local-slurm" } },
            { "action": "MOVE", "path": "/home/alice/b.dat" },
            { "action": "COPY", "path": "relative.dat" },
        ]}]);
        let p = sleep().validate(&body, &cluster()).unwrap_err();
        assert_eq!(
            pointers(&p),
            [
                ("/inputs/0/files/1/action".into(), "choices".into()),
                ("/inputs/0/files/2/path".into(), "pattern".into())
            ]
        );
        let body = json!([{ "name": "input_files", "files": [
            { "action": "COPY", "path": "/home/alice/../bob/secret" },
            { "action": "COPY", "path": "/data/x.dat", "server": { "id": "other-cluster" } },
            { "action": "COPY", "path": "/a/same.dat" },
            { "action": "COPY", "path": "/b/same.dat" },
        ]}]);
        let p = sleep().validate(&body, &cluster()).unwrap_err();
        assert_eq!(
            pointers(&p),
            [
                ("/inputs/0/files/0/path".into(), "path".into()),
                ("/inputs/0/files/1/server/id".into(), "server".into()),
                ("/inputs/0/files/3/path".into(), "staging".into()),
            ]
        );
    }
}
