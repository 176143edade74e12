//! The SSH + Slurm side of the test environment, through the `ssh2` crate the
//! mediator uses: the host key pinned in `clusters/local-slurm` is the one sshd
//! presents, a job submitted as alice runs as alice, and keys are not interchangeable.

use std::io::Read as _;
use std::net::TcpStream;
use std::time::Duration;

use hpcforge::definitions::{UploadLimits, folder};

use crate::helpers::{repo, test_env};

/// Connects to the test sshd and checks its host key against the `local-slurm`
/// definition's pinned key before anything else happens.
fn connect() -> ssh2::Session {
    let env = test_env();
    let cluster = folder::load_cluster(&repo().join("clusters/local-slurm"), None, &UploadLimits::default())
        .expect("example loads");
    let pinned = cluster.upload.definition.host_key.expect("local-slurm pins a host key");
    let tcp = TcpStream::connect((env.ssh_host.as_str(), env.ssh_port)).expect("sshd on the test port");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut s = ssh2::Session::new().unwrap();
    s.set_tcp_stream(tcp);
    s.handshake().expect("SSH handshake");
    let (key, _) = s.host_key().expect("server presents a host key");
    assert_eq!(
        key,
        pinned.blob_bytes().as_slice(),
        "sshd's host key differs from the one pinned in clusters/local-slurm"
    );
    s
}

fn run(s: &ssh2::Session, command: &str) -> (i32, String) {
    let mut ch = s.channel_session().unwrap();
    ch.exec(command).unwrap();
    let mut out = String::new();
    ch.read_to_string(&mut out).unwrap();
    ch.wait_close().unwrap();
    (ch.exit_status().unwrap(), out)
}

#[test]
fn a_job_submitted_by_alice_over_ssh_runs_as_alice() {
    let env = test_env();
    let s = connect();
    s.userauth_pubkey_file("alice", None, &env.keys["alice"], None).expect("alice's key opens alice's account");
    let (code, out) = run(
        &s,
        &format!(
            "out=$(mktemp) && sbatch --parsable --wait --quiet -p {} -o \"$out\" --wrap 'id -un' >/dev/null && cat \"$out\"; rm -f \"$out\"",
            env.partition
        ),
    );
    assert_eq!((code, out.trim()), (0, "alice"));
}

#[test]
fn bobs_key_does_not_open_alices_account() {
    let env = test_env();
    let s = connect();
    let err =
        s.userauth_pubkey_file("alice", None, &env.keys["bob"], None).expect_err("bob's key must not work for alice");
    assert!(!s.authenticated(), "{err}");
}

/// The status script, run as alice on the real Slurm: one `squeue` for all her jobs,
/// and a look-up only for the jobs it no longer lists (found with one awk, however
/// many jobs are asked about), which are left out of the answer when nothing can tell
/// (never taken as completed).
#[test]
fn the_status_script_asks_squeue_once_and_looks_up_only_the_jobs_it_lacks() {
    use hpcforge::scheduler::Scheduler as _;
    let s = crate::helpers::ssh_as("alice");
    let (code, out, err) = crate::helpers::run_remote(&s, "cd /tmp && sbatch --parsable --wrap true", "");
    assert_eq!(code, 0, "{out}{err}");
    let real = out.trim().to_owned();
    let query = |id: &str| hpcforge::scheduler::JobQuery {
        job_id: id.to_owned(),
        run_dir: "/tmp".into(),
        phase: hpcforge::model::Phase::EXECUTE,
        frames: false,
    };
    let gone = "999999999";
    let alice = hpcforge::model::UserName::parse("alice").unwrap();
    for accounting in [false, true] {
        let slurm = hpcforge::scheduler::slurm::Slurm { accounting };
        let script = slurm.status_script(&alice, &[query(&real), query(gone)]);
        let (code, body, err) = crate::helpers::run_remote(&s, "sh -s", &script);
        assert_eq!(code, 0, "{body}{err}");
        assert_eq!(body.lines().filter(|l| l.starts_with("SQUEUE 0 ")).count(), 1, "{body}");
        let lost: Vec<&str> = body.lines().filter(|l| l.starts_with("LOST ")).collect();
        if accounting {
            assert!(lost.is_empty() && body.contains("SACCT "), "{body}");
        } else {
            assert_eq!(lost.len(), 1, "only the job squeue lacks is looked up: {body}");
            assert!(lost[0].starts_with(&format!("LOST {gone} ")), "{body}");
        }
        let statuses = slurm.parse_status(&body).unwrap();
        assert!(statuses.contains_key(&real), "{statuses:?}");
        assert!(!statuses.contains_key(gone), "nothing tells about it, so it is absent: {statuses:?}");
    }
}
