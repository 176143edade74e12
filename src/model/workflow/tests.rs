//! Unit tests of the phase graph: resolving declarations, every problem at once,
//! run order, downstream phases and conditions.

use super::*;

/// The `[[phases]]` of a definition's TOML.
fn try_decls(toml_text: &str) -> Result<Vec<PhaseDecl>, toml::de::Error> {
    #[derive(Deserialize)]
    struct Doc {
        phases: Vec<PhaseDecl>,
    }
    toml::from_str::<Doc>(toml_text).map(|d| d.phases)
}

fn decls(toml_text: &str) -> Vec<PhaseDecl> {
    try_decls(toml_text).unwrap_or_else(|e| panic!("{e}"))
}

fn resolve(toml_text: &str) -> Result<PhaseGraph, Vec<(String, String)>> {
    let mut p = Problems::default();
    PhaseGraph::resolve(&decls(toml_text), &mut p)
        .ok_or_else(|| p.into_iter().map(|x| (x.pointer, x.message)).collect())
}

fn ph(name: &str) -> Phase {
    Phase::parse(name).unwrap()
}

#[test]
fn an_application_that_declares_nothing_has_the_three_phases_of_old() {
    let g = PhaseGraph::resolve(&[], &mut Problems::default()).unwrap();
    assert_eq!(g, PhaseGraph::default_shape());
    assert_eq!(g.to_string(), "prolog; execute after prolog succeeded; epilog after execute ended");
    assert_eq!(g.run_order(), Phase::DEFAULT);
    assert_eq!(g.downstream(Phase::EXECUTE), [Phase::EPILOG]);
}

#[test]
fn a_workflow_with_parallel_work_and_file_derived_waits_resolves() {
    let g = resolve(
        r#"
        [[phases]]
        name = "preprocess"
        produces = ["mesh.dat"]
        [[phases]]
        name = "work1"
        needs = ["mesh.dat"]
        produces = ["r1.dat"]
        [[phases]]
        name = "work2"
        after = ["preprocess"]
        produces = ["r2.dat"]
        [[phases]]
        name = "postprocess"
        needs = ["r1.dat", "r2.dat", "params.json"]
        [[phases]]
        name = "cleanup"
        after = [{ phase = "postprocess", when = "ended" }, { phase = "work1", when = "failed" }]
        "#,
    )
    .unwrap();
    assert_eq!(
        g.to_string(),
        "preprocess; work1 after preprocess succeeded; work2 after preprocess succeeded; \
         postprocess after work1 succeeded, work2 succeeded; cleanup after postprocess ended, work1 failed"
    );
    assert_eq!(g.reason(ph("work1"), ph("preprocess")).unwrap(), "it needs `mesh.dat`, which `preprocess` produces");
    assert_eq!(g.reason(ph("work2"), ph("preprocess")).unwrap(), "declared");
    assert_eq!(g.downstream(ph("work1")), [ph("postprocess"), ph("cleanup")]);
    assert_eq!(g.downstream(ph("postprocess")), [ph("cleanup")]);
    assert!(g.downstream(ph("cleanup")).is_empty());
    // `params.json` is nobody's product: an input, no wait.
    assert_eq!(g.waits_of(ph("postprocess")).len(), 2);
}

#[test]
fn the_run_order_puts_each_phase_after_what_it_waits_for() {
    // Declared out of order on purpose.
    let g = resolve(
        r#"
        [[phases]]
        name = "last"
        after = ["mid"]
        [[phases]]
        name = "mid"
        after = ["first"]
        [[phases]]
        name = "first"
        "#,
    )
    .unwrap();
    assert_eq!(g.run_order(), [ph("first"), ph("mid"), ph("last")]);
    assert_eq!(g.phases(), [ph("last"), ph("mid"), ph("first")]);
    assert_eq!(g.downstream(ph("first")), [ph("last"), ph("mid")]);
}

#[test]
fn a_circle_is_refused_and_named() {
    let err = resolve(
        r#"
        [[phases]]
        name = "a"
        after = ["c"]
        [[phases]]
        name = "b"
        after = ["a"]
        [[phases]]
        name = "c"
        needs = ["b.out"]
        [[phases]]
        name = "d"
        produces = ["b.out"]
        after = ["b"]
        "#,
    )
    .unwrap_err();
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].1.contains("in a circle"), "{err:?}");
    for p in ["`a`", "`b`", "`c`", "`d`"] {
        assert!(err[0].1.contains(p), "the circle names {p}: {err:?}");
    }
}

#[test]
fn every_problem_is_reported_at_once_with_its_pointer() {
    let err = resolve(
        r#"
        [[phases]]
        name = "a"
        after = ["a", "nope"]
        produces = ["out.dat", "/etc/passwd", "../x", ".hpcforge/rc_a", "x//y"]
        [[phases]]
        name = "a"
        [[phases]]
        name = "b"
        produces = ["out.dat"]
        after = ["a", { phase = "a", when = "failed" }]
        "#,
    )
    .unwrap_err();
    let got: Vec<&str> = err.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        got,
        [
            "/phases/1/name",
            "/phases/0/produces/1",
            "/phases/0/produces/2",
            "/phases/0/produces/3",
            "/phases/0/produces/4",
            "/phases/2/produces/0",
            "/phases/0/after/0",
            "/phases/0/after/1",
            "/phases/2/after/1",
        ],
        "{err:#?}"
    );
    let text = |ptr: &str| err.iter().find(|(p, _)| p == ptr).unwrap().1.clone();
    assert!(text("/phases/1/name").contains("declared twice"));
    assert!(text("/phases/0/after/0").contains("waits for itself"));
    assert!(text("/phases/0/after/1").contains("`nope`, which is not declared"));
    assert!(text("/phases/2/after/1").contains("both to have succeeded and to have failed"));
    assert!(text("/phases/2/produces/0").contains("both produce this file"));
    assert!(text("/phases/0/produces/2").contains("leaves the run directory"));
}

#[test]
fn waits_are_written_as_a_name_or_with_a_condition() {
    let d = decls(
        r#"
        [[phases]]
        name = "x"
        after = ["a", { phase = "b" }, { phase = "c", when = "ended" }, { phase = "d", when = "failed" }]
        "#,
    );
    let when: Vec<Condition> = d[0].after.iter().map(|w| w.when).collect();
    assert_eq!(when, [Condition::Succeeded, Condition::Succeeded, Condition::Ended, Condition::Failed]);
    for bad in [
        "[[phases]]\nname = \"x\"\nafter = [{ phase = \"a\", when = \"maybe\" }]",
        "[[phases]]\nname = \"Bad-Name\"",
        "[[phases]]\nname = \"x\"\nscript = \"run.sh\"",
    ] {
        assert!(try_decls(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_phase_whose_waits_contradict_each_other_is_refused() {
    // `report` needs `solve` to succeed, and `rescue`, which runs only if it failed.
    let err = resolve(
        r#"
        [[phases]]
        name = "solve"
        [[phases]]
        name = "rescue"
        after = [{ phase = "solve", when = "failed" }]
        [[phases]]
        name = "report"
        after = ["solve", "rescue"]
        [[phases]]
        name = "archive"
        after = ["report"]
        "#,
    )
    .unwrap_err();
    assert_eq!(err.len(), 1, "only the first of the chain is named: {err:?}");
    assert_eq!(err[0].0, "/phases/2/after");
    assert!(err[0].1.contains("`report` can never run") && err[0].1.contains("`solve`"), "{err:?}");
    // A handler that runs whatever happened is fine.
    resolve(
        r#"
        [[phases]]
        name = "solve"
        [[phases]]
        name = "rescue"
        after = [{ phase = "solve", when = "failed" }]
        [[phases]]
        name = "report"
        after = [{ phase = "solve", when = "ended" }, { phase = "rescue", when = "ended" }]
        "#,
    )
    .unwrap();
}

#[test]
fn conditions_are_met_by_the_states_a_phase_ends_in() {
    use crate::model::PhaseState as S;
    assert!(Condition::Succeeded.met_by(S::Completed));
    assert!(!Condition::Succeeded.met_by(S::Failed));
    assert!(Condition::Failed.met_by(S::Timeout) && Condition::Failed.met_by(S::Cancelled));
    assert!(!Condition::Failed.met_by(S::Completed) && !Condition::Failed.met_by(S::Running));
    assert!(Condition::Ended.met_by(S::Unknown) && !Condition::Ended.met_by(S::Pending));
}

#[test]
fn too_many_phases_are_refused() {
    let many: String = (0..=MAX_PHASES).map(|i| format!("[[phases]]\nname = \"p{i}\"\n")).collect();
    let err = resolve(&many).unwrap_err();
    assert_eq!(err[0].0, "/phases");
}

#[test]
fn frame_options_need_a_range_input_and_sane_numbers() {
    let spec: crate::model::ApplicationSpec = toml::from_str(
        r#"
        name = "render"
        [[inputs]]
        name = "frames"
        type = "range"
        value = "1-10"
        [[inputs]]
        name = "count"
        type = "int"
        value = 3
        [[phases]]
        name = "render"
        frames = "frames"
        max_parallel = 0
        frames_per_job = 5000
        [[phases]]
        name = "gather"
        frames = "count"
        [[phases]]
        name = "bundle"
        frames = "nope"
        max_parallel = 2
        [[phases]]
        name = "plain"
        frames_per_job = 2
        "#,
    )
    .unwrap();
    let mut p = Problems::default();
    spec.check(&mut p);
    let got: Vec<(String, String)> = p.into_iter().map(|x| (x.pointer, x.message)).collect();
    let has =
        |ptr: &str, words: &str| assert!(got.iter().any(|(p, m)| p == ptr && m.contains(words)), "{ptr}: {got:#?}");
    has("/phases/0/max_parallel", "at least 1");
    has("/phases/0/frames_per_job", "between 1 and 1024");
    has("/phases/1/frames", "`count` is a `int` input");
    has("/phases/2/frames", "there is no input `nope`");
    has("/phases/3/frames_per_job", "applies only to a phase that runs per frame");
    assert_eq!(got.len(), 5, "{got:#?}");
}

#[test]
fn frame_by_frame_waits_need_two_frame_phases_over_one_input_packed_alike_and_success() {
    let g = resolve(
        r#"
        [[phases]]
        name = "render"
        frames = "frames"
        frames_per_job = 4
        [[phases]]
        name = "gather"
        frames = "frames"
        frames_per_job = 4
        after = [{ phase = "render", per_frame = true }]
        "#,
    )
    .unwrap();
    assert_eq!(g.waits_of(ph("gather")), [Wait { per_frame: true, ..Wait::on(ph("render"), Condition::Succeeded) }]);
    assert_eq!(g.to_string(), "render; gather after render succeeded per frame");
    let problems = resolve(
        r#"
        [[phases]]
        name = "render"
        frames = "frames"
        [[phases]]
        name = "other"
        frames = "shots"
        after = [{ phase = "render", per_frame = true }]
        [[phases]]
        name = "packed"
        frames = "frames"
        frames_per_job = 2
        after = [{ phase = "render", per_frame = true }]
        [[phases]]
        name = "whole"
        after = [{ phase = "render", per_frame = true }]
        [[phases]]
        name = "handler"
        frames = "frames"
        after = [{ phase = "render", when = "failed", per_frame = true }]
        "#,
    )
    .unwrap_err();
    let at = |i: usize| problems.iter().find(|(p, _)| *p == format!("/phases/{i}/after/0")).map(|(_, m)| m.as_str());
    assert!(at(1).unwrap().contains("both must run over the same input"), "{problems:?}");
    assert!(at(2).unwrap().contains("packs 2 frames per job and `render` 1"), "{problems:?}");
    assert!(at(3).unwrap().contains("`whole` does not"), "{problems:?}");
    assert!(at(4).unwrap().contains("on success only"), "{problems:?}");
    assert_eq!(problems.len(), 4, "{problems:?}");
}
