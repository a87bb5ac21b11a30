//! One SAM tag asked for with two different layer sets (SAM's tag hashes layer names only):
//! every answer keeps naming its own image (pinned tags), superseded images stay while an
//! answer or a container may still need them, and the user is told (`shared_tag`). Real
//! engine, in-process daemon (retire.rs).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use lambda_imaged::client::proto;
use support::*;

/// Removes the test's images (by ID, with every name) and containers at the end.
#[derive(Default)]
struct Cleanup {
    images: Vec<String>,
    containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = docker(&["rm", "-f", container]);
        }
        for image in &self.images {
            let _ = docker(&["rmi", "-f", image]);
        }
    }
}

fn present(reference: &str) -> bool {
    docker(&["image", "inspect", reference]).status.success()
}

/// The image ID a name has in the engine.
fn id_of(reference: &str) -> String {
    docker_ok(&["image", "inspect", "--format", "{{.Id}}", reference])
        .trim()
        .to_owned()
}

/// Layer `dir/<which>` with `message.txt` = `which`; both directories are layer `name`.
fn layer_of(dir: &Path, which: &str) -> std::path::PathBuf {
    layer(dir, which, which)
}

/// Two functions whose layer has one logical ID but other contents ask for one tag, both at
/// once, four rounds: after each round both answers' images exist, each pinned tag names its
/// own answer's image and holds its own layer, and the tag was reported shared (naming both
/// directories). With a grace of an hour, no answered image was removed, and prune keeps
/// them too.
#[tokio::test(flavor = "multi_thread")]
async fn two_layer_sets_on_one_tag_each_keep_their_image() {
    let daemon =
        TestDaemon::start_with(|config| config.answer_grace = Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let name = unique("shared");
    let (a, b) = (
        layer_of(dir.path(), "project-a"),
        layer_of(dir.path(), "project-b"),
    );
    let mut answered = Vec::new();
    let mut tag = String::new();
    for round in 0..4 {
        let first = spawn_build(&daemon.socket, zip_request(&[(&name, &a)]));
        let second = spawn_build(&daemon.socket, zip_request(&[(&name, &b)]));
        let (first, second) = (first.await.unwrap(), second.await.unwrap());
        let answers = [
            (first.completed().clone(), "project-a"),
            (second.completed().clone(), "project-b"),
        ];
        assert_eq!(answers[0].0.tag, answers[1].0.tag, "one SAM tag for both");
        tag.clone_from(&answers[0].0.tag);
        for (answer, content) in &answers {
            cleanup.images.push(answer.image_id.clone());
            let hex = answer.image_id.trim_start_matches("sha256:");
            assert_eq!(
                answer.pinned_tag,
                format!("{}-{}", answer.tag, &hex[..16]),
                "round {round}"
            );
            assert_eq!(
                id_of(&answer.pinned_tag),
                answer.image_id,
                "round {round}: the pin names the answer"
            );
            assert_eq!(
                run_in_image(&answer.pinned_tag, "cat /opt/message.txt"),
                *content,
                "round {round}: the pinned image holds its own layer"
            );
            answered.push(answer.image_id.clone());
        }
        assert_ne!(answers[0].0.image_id, answers[1].0.image_id);
        let warned: Vec<String> = [&first, &second]
            .into_iter()
            .flat_map(|outcome| warnings_with_code(outcome, "shared_tag"))
            .collect();
        assert!(!warned.is_empty(), "round {round}: no shared_tag warning");
        for message in &warned {
            for path in [&a, &b] {
                assert!(message.contains(&path.display().to_string()), "{message}");
            }
        }
        for id in &answered {
            assert!(
                present(id),
                "round {round}: answered image {id} was removed"
            );
        }
    }
    // The superseded answers wait for the grace (about an hour from their answer). (Images an
    // engine's untag events named may be pending too: they are checked when due.)
    let pending: Vec<_> = daemon
        .retirements
        .pending()
        .into_iter()
        .filter(|(id, _)| answered.contains(id))
        .collect();
    assert!(!pending.is_empty(), "no superseded answer is pending");
    for (id, at) in &pending {
        let at = at.expect("no container uses them");
        assert!(
            at > Instant::now() + Duration::from_secs(3000),
            "{id} is due too soon"
        );
    }
    // Prune leaves recent answers alone, even with their last use made ancient: the superseded
    // ones (named by their pinned tags) and the current one.
    let record = daemon.dir.path().join("cache/used").join(hex::encode(
        <sha2::Sha256 as sha2::Digest>::digest(tag.as_bytes()),
    ));
    until(
        "the daemon to record the tag's use",
        Duration::from_secs(60),
        || record.exists(),
    )
    .await;
    std::fs::File::options()
        .write(true)
        .open(&record)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(365 * 86_400))
        .unwrap();
    let mut client = daemon.client().await;
    let report = client
        .prune(proto::PruneRequest {
            older_than_seconds: 50 * 365 * 86_400,
            keep_storage_bytes: 0,
            dry_run: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !report
            .images_removed
            .iter()
            .any(|removed| removed.starts_with(&tag)),
        "prune would remove an answer of the last hour: {report:?}"
    );
    daemon.stop().await;
}

/// A superseded image that a container uses stays until the container goes, then it goes
/// (pinned tag and all) on the engine's `destroy` event, without a prune or another build.
#[tokio::test(flavor = "multi_thread")]
async fn a_superseded_image_goes_when_its_last_container_goes() {
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cleanup = Cleanup::default();
    let name = unique("busy");
    let (a, b) = (
        layer_of(dir.path(), "busy-a"),
        layer_of(dir.path(), "busy-b"),
    );
    let old = build(&daemon.socket, zip_request(&[(&name, &a)]))
        .await
        .completed()
        .clone();
    cleanup.images.push(old.image_id.clone());
    let container = unique("lambda-imaged-busy-");
    docker_ok(&["create", "--name", &container, &old.pinned_tag, "/bin/true"]);
    cleanup.containers.push(container.clone());
    let new = build(&daemon.socket, zip_request(&[(&name, &b)]))
        .await
        .completed()
        .clone();
    cleanup.images.push(new.image_id.clone());
    assert_ne!(new.image_id, old.image_id);
    until(
        "the daemon to find the superseded image in use",
        Duration::from_secs(120),
        || {
            daemon
                .retirements
                .pending()
                .contains(&(old.image_id.clone(), None))
        },
    )
    .await;
    assert!(present(&old.image_id) && present(&old.pinned_tag));
    assert_eq!(run_in_image(&new.tag, "cat /opt/message.txt"), "busy-b");

    docker_ok(&["rm", &container]);
    until(
        "the superseded image to go with its container",
        Duration::from_secs(120),
        || !present(&old.image_id),
    )
    .await;
    assert!(!present(&old.pinned_tag), "its pinned tag went with it");
    assert!(
        present(&new.pinned_tag) && present(&new.tag),
        "the current image stays"
    );
    // (Its removal's own untag event may queue it once more, to be found gone.)
    until(
        "it to be no longer pending",
        Duration::from_secs(60),
        || {
            !daemon
                .retirements
                .pending()
                .iter()
                .any(|(id, _)| *id == old.image_id)
        },
    )
    .await;
    daemon.stop().await;
}
