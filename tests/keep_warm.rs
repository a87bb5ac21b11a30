//! Keep-warm (`--keep-warm`): after a request, an edit of its layer source is rebuilt in the
//! background, so the next request is up to date with the new content; a burst of saves is
//! one or two rebuilds; a deleted source ends its watch. Every wait polls the daemon's own
//! state (ListBuilds, GetInfo), never a sleep.

mod support;

use std::path::Path;
use std::time::Duration;

use lambda_imaged::client::proto;
use support::*;
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(120);

async fn keep_warm_daemon() -> TestDaemon {
    TestDaemon::start_with(|config| config.keep_warm = Duration::from_secs(3600)).await
}

async fn keep_warm_info(daemon: &TestDaemon) -> proto::KeepWarmInfo {
    let info = daemon
        .client()
        .await
        .get_info(proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    info.keep_warm.expect("keep-warm is on")
}

async fn watched(daemon: &TestDaemon, path: &Path) -> Option<proto::WatchedSource> {
    let path = path.display().to_string();
    keep_warm_info(daemon)
        .await
        .sources
        .into_iter()
        .find(|source| source.path == path)
}

/// Builds `request` and waits until its layer source `path` is watched; returns the tag.
async fn built_and_watched(
    daemon: &TestDaemon,
    request: &proto::BuildRequest,
    path: &Path,
) -> String {
    let tag = build(&daemon.socket, request.clone())
        .await
        .completed()
        .tag
        .clone();
    until_async("the layer source watched", DEADLINE, || async {
        watched(daemon, path).await.is_some()
    })
    .await;
    tag
}

/// Background rebuilds of `tag` that have finished (ListBuilds' history, marked background).
fn background_rebuilds(daemon: &TestDaemon, tag: &str) -> usize {
    let (in_flight, recent) = daemon.builds.list();
    assert!(
        in_flight.iter().all(|b| b.tag != tag || b.background),
        "a client build of {tag} ran"
    );
    recent
        .iter()
        .filter(|b| b.tag == tag && b.background)
        .count()
}

/// An edit of one file of a watched directory layer is rebuilt in the background (ListBuilds
/// lists it as such); the next request is a hit whose image holds the new content.
#[tokio::test(flavor = "multi_thread")]
async fn an_edit_is_rebuilt_in_the_background_and_the_next_request_is_up_to_date() {
    let daemon = keep_warm_daemon().await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "before");
    write_file(&path.join("lib/other.txt"), "unchanged", 0o644);
    let name = unique("warm");
    let request = zip_request(&[(&name, &path)]);
    let tag = built_and_watched(&daemon, &request, &path).await;
    let source = watched(&daemon, &path).await.unwrap();
    assert_eq!(
        (source.mode.as_str(), source.tags),
        ("inotify", vec![tag.clone()])
    );
    assert_eq!(keep_warm_info(&daemon).await.inotify_watches, 2); // l/ and l/lib/

    write_file(&path.join("message.txt"), "after!", 0o644);
    until("a background rebuild", DEADLINE, || {
        background_rebuilds(&daemon, &tag) == 1 && daemon.builds.in_flight() == 0
    })
    .await;
    let next = build(&daemon.socket, request).await;
    assert!(next.completed().cached, "{:?}", next.completed());
    assert_eq!(
        run_in_image(&tag, "cat /opt/message.txt /opt/lib/other.txt"),
        "after!unchanged"
    );
    docker_ok(&["image", "rm", "-f", &tag]);
    daemon.stop().await;
}

/// 50 saves as fast as they can be made give one or two background rebuilds, not 50, and the
/// image ends with the last save.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_fifty_saves_is_one_or_two_rebuilds() {
    let daemon = keep_warm_daemon().await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "save 0");
    let name = unique("burst");
    let request = zip_request(&[(&name, &path)]);
    let tag = built_and_watched(&daemon, &request, &path).await;
    for save in 1..=50 {
        write_file(&path.join("message.txt"), &format!("save {save}"), 0o644);
    }
    until("the burst rebuilt", DEADLINE, || {
        background_rebuilds(&daemon, &tag) >= 1 && daemon.builds.in_flight() == 0
    })
    .await;
    let last = build(&daemon.socket, request).await;
    assert_eq!(run_in_image(&tag, "cat /opt/message.txt"), "save 50");
    let rebuilds = keep_warm_info(&daemon).await.rebuilds;
    assert!(
        (1..=2).contains(&rebuilds),
        "{rebuilds} rebuilds for 50 saves"
    );
    assert!(
        last.completed().cached
            || last.events.iter().any(|e| matches!(
                &e.event,
                Some(proto::build_event::Event::Accepted(a)) if a.joined
            )),
        "the request after the burst built again: {:?}",
        last.completed()
    );
    docker_ok(&["image", "rm", "-f", &tag]);
    daemon.stop().await;
}

/// A zip layer is watched by its file: replacing the archive rebuilds in the background.
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_zip_layer_is_rebuilt_in_the_background() {
    let daemon = keep_warm_daemon().await;
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("layer.zip");
    write_zip(&archive, "zip before");
    let name = unique("warmzip");
    let request = zip_request(&[(&name, &archive)]);
    let tag = built_and_watched(&daemon, &request, &archive).await;
    write_zip(&archive, "zip after");
    until("a background rebuild", DEADLINE, || {
        background_rebuilds(&daemon, &tag) == 1 && daemon.builds.in_flight() == 0
    })
    .await;
    assert!(build(&daemon.socket, request).await.completed().cached);
    assert_eq!(run_in_image(&tag, "cat /opt/message.txt"), "zip after");
    docker_ok(&["image", "rm", "-f", &tag]);
    daemon.stop().await;
}

/// Writes a zip archive holding message.txt, through a temp file renamed over `path` (as zip
/// tools and editors replace a file).
fn write_zip(path: &Path, message: &str) {
    use std::io::Write;
    let part = path.with_extension("part");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&part).unwrap());
    zip.start_file("message.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    zip.write_all(message.as_bytes()).unwrap();
    zip.finish().unwrap();
    std::fs::rename(&part, path).unwrap();
}

/// A watched layer directory deleted: no crash, the watch ends, the daemon goes on serving,
/// and the next request is told which path is missing.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_layer_directory_ends_its_watch() {
    let daemon = keep_warm_daemon().await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "doomed");
    let name = unique("gone");
    let request = zip_request(&[(&name, &path)]);
    let tag = built_and_watched(&daemon, &request, &path).await;
    std::fs::remove_dir_all(&path).unwrap();
    until_async("the watch ended", DEADLINE, || async {
        watched(&daemon, &path).await.is_none()
    })
    .await;
    assert_eq!(keep_warm_info(&daemon).await.inotify_watches, 0);
    let outcome = build(&daemon.socket, request).await;
    assert_eq!(outcome.status().code(), Code::NotFound);
    assert!(
        outcome
            .status()
            .message()
            .contains(&path.display().to_string()),
        "{}",
        outcome.status().message()
    );
    assert_eq!(background_rebuilds(&daemon, &tag), 0);
    docker_ok(&["image", "rm", "-f", &tag]);
    daemon.stop().await;
}

/// Past the inotify watch budget (here 0, as at the kernel's limit) a source is watched by a
/// periodic stat walk instead: GetInfo says "poll", and an edit is still rebuilt in the
/// background.
#[tokio::test(flavor = "multi_thread")]
async fn past_the_watch_budget_a_source_is_polled_and_still_kept_warm() {
    let daemon = TestDaemon::start_with(|config| {
        config.keep_warm = Duration::from_secs(3600);
        config.keep_warm_inotify_watches = 0;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path(), "l", "polled before");
    let name = unique("poll");
    let request = zip_request(&[(&name, &path)]);
    let tag = built_and_watched(&daemon, &request, &path).await;
    assert_eq!(watched(&daemon, &path).await.unwrap().mode, "poll");
    assert_eq!(keep_warm_info(&daemon).await.inotify_watches, 0);
    // Another size too: the stat walk compares times and sizes, and a write within the same
    // second may keep the time.
    write_file(&path.join("message.txt"), "polled after, longer", 0o644);
    until("a background rebuild", DEADLINE, || {
        background_rebuilds(&daemon, &tag) == 1 && daemon.builds.in_flight() == 0
    })
    .await;
    assert!(build(&daemon.socket, request).await.completed().cached);
    assert_eq!(
        run_in_image(&tag, "cat /opt/message.txt"),
        "polled after, longer"
    );
    docker_ok(&["image", "rm", "-f", &tag]);
    daemon.stop().await;
}
