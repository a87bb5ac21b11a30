//! One build per tag: concurrent requests share a build, late joiners get the whole story,
//! clients may leave, different inputs never share an image, failures reach everyone.
//! Builds are held at known points with the daemon's test gates, never with sleeps.

mod support;

use std::sync::Arc;
use std::time::Duration;

use lambda_imaged::client::proto;
use lambda_imaged::server::{Builds, Phase};
use proto::build_event::Event;
use support::*;
use tokio::sync::Semaphore;
use tonic::Code;

fn subscribers(builds: &Builds) -> u32 {
    builds.list().0.iter().map(|s| s.subscribers).sum()
}

fn gated() -> (Arc<Semaphore>, Arc<Semaphore>) {
    (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)))
}

async fn daemon_with(
    before: &Arc<Semaphore>,
    after: &Arc<Semaphore>,
    parallel: usize,
) -> TestDaemon {
    let (before, after) = (before.clone(), after.clone());
    TestDaemon::start_with(move |config| {
        config.hooks.before_build = Some(before);
        config.hooks.after_build = Some(after);
        config.max_parallel_builds = parallel;
    })
    .await
}

/// N concurrent identical requests: exactly one engine build; every client receives the same
/// event sequence and the same image id; the table is empty afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_identical_requests_share_one_build() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "shared");
    let name = unique("dedup");
    let request = zip_request(&[(&name, &path)]);
    let since = now_stamp();
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(spawn_build(&daemon.socket, request.clone()));
    }
    until(
        "8 subscribers on one build",
        Duration::from_secs(60),
        || daemon.builds.in_flight() == 1 && subscribers(&daemon.builds) == 8,
    )
    .await;
    before.add_permits(1);
    after.add_permits(1);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.push(client.await.unwrap());
    }
    let first = outcomes[0].completed().clone();
    assert!(!first.cached);
    let joined = outcomes
        .iter()
        .filter(|o| matches!(&o.events[0].event, Some(Event::Accepted(a)) if a.joined))
        .count();
    assert_eq!(joined, 7, "one starter, seven joiners");
    let reference = outcomes[0].shared_events();
    assert!(reference.iter().any(|e| matches!(e, Event::Log(_))));
    for outcome in &outcomes {
        assert_eq!(
            outcome.shared_events(),
            reference,
            "identical event sequences"
        );
        assert_eq!(outcome.completed().image_id, first.image_id);
    }
    assert_eq!(
        engine_builds(&first.tag, &since),
        1,
        "exactly one engine build"
    );
    until("an empty table", Duration::from_secs(60), || {
        daemon.builds.in_flight() == 0
    })
    .await;
    rmi_all(&first.tag);
    daemon.stop().await;
}

/// A client that attaches after the engine has built receives every event from the start.
#[tokio::test(flavor = "multi_thread")]
async fn late_joiner_gets_the_events_it_missed() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "late");
    let name = unique("late");
    let request = zip_request(&[(&name, &path)]);
    let early = spawn_build(&daemon.socket, request.clone());
    before.add_permits(1);
    // The engine has finished (the build is parked at the after-build gate) once its log
    // holds "loaded <image>": everything before that is history for the late joiner.
    until("the engine build to finish", Duration::from_secs(60), || {
        let tag = daemon.builds.list().0.first().map(|s| s.tag.clone()).unwrap_or_default();
        daemon.builds.events_of(&tag).is_some_and(|events| {
            events.iter().any(|e| matches!(e, lambda_imaged::server::BuildLogEvent::Log { text, .. } if text.starts_with("loaded ")))
        })
    })
    .await;
    let late = spawn_build(&daemon.socket, request.clone());
    until("two subscribers", Duration::from_secs(60), || {
        subscribers(&daemon.builds) == 2
    })
    .await;
    after.add_permits(1);
    let (early, late) = (early.await.unwrap(), late.await.unwrap());
    assert!(matches!(&late.events[0].event, Some(Event::Accepted(a)) if a.joined));
    assert_eq!(late.shared_events(), early.shared_events());
    assert!(
        late.events
            .iter()
            .any(|e| matches!(&e.event, Some(Event::Log(l)) if l.text.starts_with("layer 1/")))
    );
    assert_eq!(late.completed().image_id, early.completed().image_id);
    rmi_all(&early.completed().tag);
    daemon.stop().await;
}

/// Clients that disconnect mid-build cancel nothing: the others finish, and when all are
/// gone the build still completes and serves the next request from cache.
#[tokio::test(flavor = "multi_thread")]
async fn disconnecting_clients_do_not_cancel_the_build() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "leave");
    let name = unique("leave");
    let request = zip_request(&[(&name, &path)]);
    let leaver = spawn_build(&daemon.socket, request.clone());
    let stayer = spawn_build(&daemon.socket, request.clone());
    until("two subscribers", Duration::from_secs(60), || {
        subscribers(&daemon.builds) == 2
    })
    .await;
    leaver.abort();
    until("the leaver to be gone", Duration::from_secs(60), || {
        subscribers(&daemon.builds) == 1
    })
    .await;
    before.add_permits(1);
    after.add_permits(1);
    let done = stayer.await.unwrap().completed().clone();
    assert!(!done.cached);
    rmi_all(&done.tag);

    // Everyone leaves: the build still runs to its end.
    let only = spawn_build(&daemon.socket, request.clone());
    until("one subscriber", Duration::from_secs(60), || {
        subscribers(&daemon.builds) == 1
    })
    .await;
    only.abort();
    until("no subscriber", Duration::from_secs(60), || {
        subscribers(&daemon.builds) == 0
    })
    .await;
    assert_eq!(daemon.builds.in_flight(), 1, "the build is still in flight");
    before.add_permits(1);
    after.add_permits(1);
    until("the build to end", Duration::from_secs(60), || {
        daemon.builds.in_flight() == 0
    })
    .await;
    let recent = daemon.builds.list().1;
    assert_eq!(recent[0].phase, Phase::Succeeded, "{:?}", recent[0]);
    let next = build(&daemon.socket, request).await;
    assert!(
        next.completed().cached,
        "the abandoned build's image serves the next request"
    );
    rmi_all(&next.completed().tag);
    daemon.stop().await;
}

/// Two requests for one tag from different layer contents never share an image: the second,
/// sent while the first is held at its gate, does not attach to it (a build of its own, after
/// the first ended) and its image holds its own content.
#[tokio::test(flavor = "multi_thread")]
async fn same_tag_different_inputs_build_separately() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let one = layer(dir.path(), "one", "content one");
    let two = layer(dir.path(), "two", "content two");
    let name = unique("same");
    let first = spawn_build(&daemon.socket, zip_request(&[(&name, &one)]));
    until("the first build", Duration::from_secs(60), || {
        subscribers(&daemon.builds) == 1
    })
    .await;
    let second = spawn_build(&daemon.socket, zip_request(&[(&name, &two)]));
    before.add_permits(1);
    after.add_permits(1);
    let first = first.await.unwrap();
    let first_id = first.events[0].build_id.clone();
    let first = first.completed().clone();
    // The second builds on its own and parks at the gate: check the first image meanwhile.
    until(
        "the second build at the gate",
        Duration::from_secs(60),
        || {
            let (flying, _) = daemon.builds.list();
            flying.len() == 1 && flying[0].build_id != first_id && flying[0].phase == Phase::Running
        },
    )
    .await;
    assert_eq!(
        run_in_image(&first.image_id, "cat /opt/message.txt"),
        "content one"
    );
    before.add_permits(1);
    after.add_permits(1);
    let second = second.await.unwrap();
    assert!(
        matches!(&second.events[0].event, Some(Event::Accepted(a)) if !a.joined),
        "the second request attached to a build: {:?}",
        second.events[0]
    );
    assert_ne!(second.events[0].build_id, first_id);
    let second = second.completed().clone();
    assert_eq!(
        second.reason,
        proto::Reason::LayerChanged as i32,
        "{second:?}"
    );
    assert_eq!(second.tag, first.tag);
    assert_ne!(second.image_id, first.image_id);
    assert_eq!(
        run_in_image(&second.tag, "cat /opt/message.txt"),
        "content two"
    );
    rmi_all(&second.tag);
    daemon.stop().await;
}

/// A build that fails fails every subscriber with the same status; the next request retries.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_reaches_every_subscriber_and_the_next_request_retries() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "vanishing");
    let name = unique("fail");
    let request = zip_request(&[(&name, &path)]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(spawn_build(&daemon.socket, request.clone()));
    }
    until(
        "three subscribers at the gate",
        Duration::from_secs(60),
        || subscribers(&daemon.builds) == 3 && first_build_running(&daemon.builds),
    )
    .await;
    // The layer vanishes after it was walked, before the context is sent.
    std::fs::remove_file(path.join("message.txt")).unwrap();
    before.add_permits(1);
    let mut statuses = Vec::new();
    for client in clients {
        let outcome = client.await.unwrap();
        statuses.push((
            outcome.status().code(),
            outcome.status().message().to_owned(),
        ));
    }
    assert!(statuses.iter().all(|s| *s == statuses[0]), "{statuses:?}");
    assert_eq!(statuses[0].0, Code::NotFound, "{statuses:?}");
    assert!(statuses[0].1.contains("message.txt"), "{statuses:?}");
    until("an empty table", Duration::from_secs(60), || {
        daemon.builds.in_flight() == 0
    })
    .await;

    write_file(&path.join("message.txt"), "back", 0o644);
    before.add_permits(1);
    after.add_permits(1);
    let retry = build(&daemon.socket, request).await;
    assert!(!retry.completed().cached);
    rmi_all(&retry.completed().tag);
    daemon.stop().await;
}

/// Distinct tags beyond the parallel limit are queued (with their position) and all complete.
#[tokio::test(flavor = "multi_thread")]
async fn builds_beyond_the_limit_are_queued() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut clients = Vec::new();
    for index in 0..3 {
        let path = layer(dir.path(), &format!("l{index}"), &format!("queued {index}"));
        let name = unique("queue");
        let socket = daemon.socket.clone();
        clients.push(tokio::spawn(async move {
            build(&socket, zip_request(&[(&name, &path)])).await
        }));
        until(
            "the build to be registered",
            Duration::from_secs(60),
            || daemon.builds.in_flight() == index + 1,
        )
        .await;
        until("the build to run or queue", Duration::from_secs(60), || {
            daemon
                .builds
                .list()
                .0
                .iter()
                .all(|s| matches!(s.phase, Phase::Running | Phase::Queued))
        })
        .await;
    }
    let phases: Vec<Phase> = daemon.builds.list().0.iter().map(|s| s.phase).collect();
    assert_eq!(phases, [Phase::Running, Phase::Queued, Phase::Queued]);
    before.add_permits(3);
    after.add_permits(3);
    let mut queued_positions = Vec::new();
    for client in clients {
        let outcome = client.await.unwrap();
        assert!(!outcome.completed().cached);
        queued_positions.extend(outcome.events.iter().filter_map(|e| match &e.event {
            Some(Event::Queued(q)) => Some(q.position),
            _ => None,
        }));
        rmi_all(&outcome.completed().tag);
    }
    queued_positions.sort();
    assert_eq!(queued_positions, [1, 2]);
    assert_eq!(daemon.builds.in_flight(), 0);
    daemon.stop().await;
}

/// A forced rebuild that arrives while the same tag is being built from the same inputs joins
/// that build instead of starting a second one.
#[tokio::test(flavor = "multi_thread")]
async fn a_forced_request_joins_a_running_build_of_the_same_inputs() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "forced");
    let name = unique("force");
    let request = zip_request(&[(&name, &path)]);
    let since = now_stamp();
    let first = spawn_build(&daemon.socket, request.clone());
    until("the build to hold a slot", Duration::from_secs(60), || {
        first_build_running(&daemon.builds)
    })
    .await;
    let mut forced_request = request.clone();
    forced_request.force_image_build = true;
    let forced = spawn_build(&daemon.socket, forced_request);
    until("two subscribers", Duration::from_secs(60), || {
        subscribers(&daemon.builds) == 2
    })
    .await;
    before.add_permits(1);
    after.add_permits(1);
    let (first, forced) = (first.await.unwrap(), forced.await.unwrap());
    assert!(matches!(&forced.events[0].event, Some(Event::Accepted(a)) if a.joined));
    assert_eq!(forced.completed().image_id, first.completed().image_id);
    assert_eq!(engine_builds(&first.completed().tag, &since), 1);
    rmi_all(&first.completed().tag);
    daemon.stop().await;
}

/// A layer file rewritten (same size) between the walk that fingerprinted it and the upload
/// fails the build: the image never holds other bytes than its fingerprint describes.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_swapped_after_fingerprinting_fails_the_build() {
    let (before, after) = gated();
    let daemon = daemon_with(&before, &after, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "version 1");
    let request = zip_request(&[(&unique("swap"), &path)]);
    let client = spawn_build(&daemon.socket, request.clone());
    until(
        "the build to wait at the gate",
        Duration::from_secs(60),
        || first_build_running(&daemon.builds),
    )
    .await;
    write_file(&path.join("message.txt"), "version 2", 0o644);
    before.add_permits(1);
    after.add_permits(1);
    let outcome = client.await.unwrap();
    let status = outcome.status();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("message.txt"),
        "{}",
        status.message()
    );
    daemon.stop().await;
}
