//! Workflows over agents with a runner that records what ran where and when: the
//! orchestrator's DAG in dependency order within each worker's concurrency, the router, parallel
//! fan-out/fan-in and the evaluator-optimizer loop. Overlap is proven, not hoped for: the runner
//! can hold every run until a given number are in flight at once.

use std::sync::Mutex;
use std::time::Duration;

use concord_agents::workflow::{AgentRunner, DagTask, Route, Worker, Workflow, WorkflowError};
use futures::future::BoxFuture;

struct Recorder {
    /// (agent, prompt) in start order.
    started: Mutex<Vec<(String, String)>>,
    /// Events: ("start"|"end", agent, first line of the prompt).
    events: Mutex<Vec<(&'static str, String, String)>>,
    in_flight: Mutex<std::collections::HashMap<String, usize>>,
    peak: Mutex<std::collections::HashMap<String, usize>>,
    /// Scripted answers by agent (popped in order); default: "<agent> did <first line>".
    answers: Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// No run finishes before this many runs have been in flight at the same time (once that
    /// happened, runs finish freely). 0: runs never wait.
    wave: usize,
    /// Runs in flight, every agent together.
    total_in_flight: Mutex<usize>,
    /// Open once `wave` runs were in flight together.
    gate: tokio::sync::watch::Sender<bool>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::holding_until(0)
    }
}

impl Recorder {
    /// A recorder whose runs wait until `wave` of them are in flight at once.
    fn holding_until(wave: usize) -> Self {
        Self {
            started: Mutex::default(),
            events: Mutex::default(),
            in_flight: Mutex::default(),
            peak: Mutex::default(),
            answers: Mutex::default(),
            wave,
            total_in_flight: Mutex::new(0),
            gate: tokio::sync::watch::Sender::new(wave == 0),
        }
    }
}

impl AgentRunner for Recorder {
    fn run<'a>(&'a self, agent: &'a str, task: String) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let first = task.lines().next().unwrap_or_default().to_string();
            self.started
                .lock()
                .unwrap()
                .push((agent.to_string(), task.clone()));
            self.events
                .lock()
                .unwrap()
                .push(("start", agent.to_string(), first.clone()));
            {
                let mut in_flight = self.in_flight.lock().unwrap();
                let n = in_flight.entry(agent.to_string()).or_default();
                *n += 1;
                let mut peak = self.peak.lock().unwrap();
                let p = peak.entry(agent.to_string()).or_default();
                *p = (*p).max(*n);
                let mut total = self.total_in_flight.lock().unwrap();
                *total += 1;
                if *total >= self.wave {
                    self.gate.send_replace(true);
                }
            }
            // Wait for the wave (the timeout only turns a hang into a failure).
            let mut gate = self.gate.subscribe();
            let opened = tokio::time::timeout(Duration::from_secs(60), gate.wait_for(|open| *open))
                .await
                .is_ok();
            assert!(
                opened,
                "{} runs were never in flight at once: {:?}",
                self.wave,
                self.events.lock().unwrap()
            );
            *self.total_in_flight.lock().unwrap() -= 1;
            *self.in_flight.lock().unwrap().get_mut(agent).unwrap() -= 1;
            self.events
                .lock()
                .unwrap()
                .push(("end", agent.to_string(), first.clone()));
            let scripted = self
                .answers
                .lock()
                .unwrap()
                .get_mut(agent)
                .and_then(|a| (!a.is_empty()).then(|| a.remove(0)));
            Ok(scripted.unwrap_or_else(|| format!("{agent} did {first}")))
        })
    }
}

fn task(id: &str, capability: &str, depends_on: &[&str]) -> DagTask {
    DagTask {
        id: id.into(),
        capability: capability.into(),
        task: format!("do {id}"),
        depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
    }
}

#[tokio::test]
async fn a_dag_of_five_tasks_runs_in_dependency_order_within_each_workers_concurrency() {
    let workflow = Workflow::Orchestrator {
        workers: vec![
            Worker {
                agent: "solo".into(),
                capabilities: vec!["write".into()],
                max_concurrency: 1,
            },
            Worker {
                agent: "pair".into(),
                capabilities: vec!["write".into(), "review".into()],
                max_concurrency: 2,
            },
        ],
        tasks: vec![
            task("a", "write", &[]),
            task("b", "write", &[]),
            task("f", "write", &[]),
            task("c", "write", &["a"]),
            task("d", "review", &["a", "b"]),
        ],
    };
    // a, b and f are ready at once and three slots are free: none may finish before all three
    // have started.
    let recorder = Recorder::holding_until(3);
    let report = workflow.run("build the thing", &recorder).await.unwrap();
    assert_eq!(report.steps.len(), 5);
    let events = recorder.events.lock().unwrap().clone();
    let at = |kind: &str, id: &str| {
        events
            .iter()
            .position(|(k, _, first)| *k == kind && first == &format!("do {id}"))
            .unwrap_or_else(|| panic!("{kind} {id} missing: {events:?}"))
    };
    // Dependencies finish before their dependents start.
    for (dependent, dependency) in [("c", "a"), ("d", "a"), ("d", "b")] {
        assert!(
            at("end", dependency) < at("start", dependent),
            "{dependent} before {dependency}: {events:?}"
        );
    }
    // a, b and f are ready at once: solo takes one, pair takes two (least loaded first).
    let first_three: Vec<&str> = events[..3].iter().map(|e| e.0).collect();
    assert_eq!(first_three, ["start", "start", "start"], "{events:?}");
    let peak = recorder.peak.lock().unwrap().clone();
    assert_eq!(peak["solo"], 1, "solo's max_concurrency is 1");
    assert_eq!(peak["pair"], 2, "pair ran two at once, never more");
    // The review went to the only worker with that capability, with both results as context.
    let started = recorder.started.lock().unwrap().clone();
    let (agent, prompt) = started.iter().find(|(_, p)| p.starts_with("do d")).unwrap();
    assert_eq!(agent, "pair");
    assert!(prompt.contains("Overall goal: build the thing"), "{prompt}");
    assert!(
        prompt.contains("Result of a:\n") && prompt.contains("Result of b:\n"),
        "{prompt}"
    );
    // The answer: the tasks nothing depends on (b is needed by d; f, c and d are ends).
    assert!(
        report.answer.contains("did do f")
            && report.answer.contains("did do c")
            && report.answer.contains("did do d")
    );
    assert!(!report.answer.contains("did do a"));
}

#[tokio::test]
async fn bad_dags_are_refused_before_anything_runs() {
    let recorder = Recorder::default();
    let workers = vec![Worker {
        agent: "w".into(),
        capabilities: vec!["write".into()],
        max_concurrency: 1,
    }];
    for (tasks, expected) in [
        (
            vec![task("a", "write", &["b"]), task("b", "write", &["a"])],
            "cycle",
        ),
        (vec![task("a", "write", &["zzz"])], "unknown task zzz"),
        (
            vec![task("a", "paint", &[])],
            "no worker has capability paint",
        ),
    ] {
        let error = Workflow::Orchestrator {
            workers: workers.clone(),
            tasks,
        }
        .run("x", &recorder)
        .await
        .unwrap_err();
        assert!(
            matches!(&error, WorkflowError::Invalid(m) if m.contains(expected)),
            "{error}"
        );
    }
    assert!(recorder.started.lock().unwrap().is_empty());
}

#[tokio::test]
async fn router_parallel_and_evaluator() {
    // Router: a rule first; else the router agent names one.
    let router = Workflow::Router {
        routes: vec![Route {
            contains: vec!["invoice".into()],
            agent: "billing".into(),
        }],
        router_agent: Some("dispatcher".into()),
        agents: vec!["billing".into(), "support".into()],
        fallback: None,
    };
    let recorder = Recorder::default();
    let report = router.run("Where is my Invoice?", &recorder).await.unwrap();
    assert_eq!(
        report
            .steps
            .iter()
            .map(|s| s.agent.as_str())
            .collect::<Vec<_>>(),
        ["billing"]
    );
    recorder
        .answers
        .lock()
        .unwrap()
        .insert("dispatcher".into(), vec!["support, I think".into()]);
    let report = router.run("My screen is black", &recorder).await.unwrap();
    assert_eq!(
        report
            .steps
            .iter()
            .map(|s| s.agent.as_str())
            .collect::<Vec<_>>(),
        ["dispatcher", "support"]
    );

    // Parallel: everyone at once, then the combiner.
    let parallel = Workflow::Parallel {
        agents: vec!["x".into(), "y".into()],
        combine: Some("z".into()),
    };
    let recorder = Recorder::holding_until(2);
    let report = parallel.run("ideas", &recorder).await.unwrap();
    let events = recorder.events.lock().unwrap().clone();
    assert_eq!(
        (events[0].0, events[1].0),
        ("start", "start"),
        "fan-out is concurrent: {events:?}"
    );
    let combine_prompt = recorder.started.lock().unwrap()[2].1.clone();
    assert!(
        combine_prompt.contains("[x]\nx did ideas") && combine_prompt.contains("[y]\ny did ideas")
    );
    assert_eq!(
        report.answer,
        "z did Combine these answers to the task into one."
    );

    // Evaluator-optimizer: FAIL with feedback, then PASS.
    let loop_ = Workflow::Evaluator {
        generator: "dev".into(),
        evaluator: "qa".into(),
        max_rounds: 3,
    };
    let recorder = Recorder::default();
    recorder
        .answers
        .lock()
        .unwrap()
        .insert("dev".into(), vec!["v1".into(), "v2".into()]);
    recorder
        .answers
        .lock()
        .unwrap()
        .insert("qa".into(), vec!["FAIL: off by one".into(), "PASS".into()]);
    let report = loop_.run("count to 3", &recorder).await.unwrap();
    assert_eq!(report.answer, "v2");
    let second_draft = recorder.started.lock().unwrap()[2].1.clone();
    assert!(
        second_draft.contains("Reviewer feedback:\nFAIL: off by one"),
        "{second_draft}"
    );
}
