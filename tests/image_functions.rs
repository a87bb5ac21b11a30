//! IMAGE functions and invoke images end to end, against the real engine, the real
//! `docker-registry` on loopback and the real RIE: an image function pushed to the registry is
//! pulled once, tagged `<host:port>/<repo>:rapid-<arch>`, reported with its own run config,
//! never checked for freshness, and invoked through the RIE as SAM runs it; a per-function
//! invoke image beats the global one (design §1), with and without layers.

mod support;

use std::time::Duration;

use lambda_imaged::client::{Client, InvokeImageArg, LayerArg, RequestBuilder, proto};
use proto::build_event::Event;
use sha2::{Digest, Sha256};
use support::registry::{Proxy, registry};
use support::*;

/// The function's entry script: writes where it runs, one variable of the image's ENV and its
/// arguments (the image's CMD) to /opt/message.txt, which the bootstrap fixture answers with.
const ENTRY: &str = "#!/bin/sh\nprintf '%s|%s|%s' \"$(pwd)\" \"$GREETING\" \"$*\" > /opt/message.txt\nexec /app/bootstrap\n";

/// An IMAGE function from the registry: pulled once when missing, tagged with the registry's
/// host:port kept, its ENTRYPOINT/CMD/WORKDIR/ENV reported in Completed.config, never checked
/// for freshness (even with a TTL of 0, no manifest request and no warning after the pull), and
/// invoked through the RIE with that ENTRYPOINT and CMD, in that WORKDIR, with that ENV.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_function_from_a_registry_is_pulled_once_and_invoked() {
    let proxy = Proxy::start(registry()).await;
    let repository = format!("lambda-imaged-test/{}", unique("imagefn"));
    let pushed = format!("{}/{repository}:v1", registry());
    docker_build(
        &pushed,
        "FROM public.ecr.aws/lambda/python:3.12-x86_64\n\
         COPY entry.sh bootstrap /app/\n\
         ENV GREETING=hello-from-env\n\
         WORKDIR /app\n\
         ENTRYPOINT [\"/app/entry.sh\"]\n\
         CMD [\"handler.main\"]\n",
        &[
            ("entry.sh", ENTRY, 0o755),
            ("bootstrap", &bootstrap_fixture(), 0o755),
        ],
    );
    docker_ok(&["push", &pushed]);
    docker_ok(&["rmi", &pushed]);
    // The daemon sees the registry through the counting proxy.
    let image = format!("{}/{repository}:v1", proxy.addr);
    let daemon = TestDaemon::start_with(|config| config.base_check_ttl = Duration::ZERO).await;
    let request = RequestBuilder::image(&image).finish().unwrap();

    let first = build(&daemon.socket, request.clone()).await;
    let done = first.completed().clone();
    assert_eq!(done.reason, proto::Reason::Missing as i32);
    assert_eq!(
        done.tag,
        format!("{}/{repository}:rapid-x86_64", proxy.addr),
        "registry host:port kept in the tag"
    );
    assert!(
        first.events.iter().any(
            |e| matches!(&e.event, Some(Event::Log(l)) if l.text == format!("pulling {image}"))
        ),
        "{first:?}"
    );
    let pulled = proxy.manifest_requests_for(&repository, "v1");
    assert_eq!(pulled, 1, "one pull");
    let config = done.config.clone().expect("Completed carries the config");
    assert_eq!(config.entrypoint, ["/app/entry.sh"]);
    assert_eq!(config.cmd, ["handler.main"]);
    assert_eq!(config.working_dir, "/app");
    assert!(
        config.env.iter().any(|e| e == "GREETING=hello-from-env"),
        "{:?}",
        config.env
    );

    // Never checked: with a TTL of 0 a checked base would warn on every request.
    for _ in 0..2 {
        let again = build(&daemon.socket, request.clone()).await;
        let hit = again.completed();
        assert_eq!(hit.reason, proto::Reason::UpToDate as i32, "{hit:?}");
        assert_eq!(hit.image_id, done.image_id);
        assert!(
            warnings_with_code(&again, "base_unverified").is_empty(),
            "{again:?}"
        );
    }
    assert_eq!(
        proxy.manifest_requests_for(&repository, "v1"),
        pulled,
        "an IMAGE function's image is never asked of the registry again"
    );

    // As SAM runs it: the RIE, then the image's ENTRYPOINT and CMD.
    let command: Vec<&str> = config
        .entrypoint
        .iter()
        .chain(&config.cmd)
        .map(String::as_str)
        .collect();
    let response = invoke_through_rie_running(&done.tag, &command).await;
    assert_eq!(
        response,
        r#"{"echo":{"ping":1},"layer":"/app|hello-from-env|handler.main"}"#
    );
    daemon.stop().await;
    docker(&["rmi", &done.tag]);
    docker(&["rmi", &image]);
}

/// SAM's layered tag: `samcli/lambda-<name:tag>-<first 25 hex of sha256("-".join(names))>`.
fn sam_layered_tag(name_tag: &str, layer_names: &[&str]) -> String {
    let hash = hex::encode(Sha256::digest(layer_names.join("-").as_bytes()));
    format!("samcli/lambda-{name_tag}-{}", &hash[..25])
}

/// Two local invoke images, each with `/marker` naming it: the per-function entry beats the
/// global one for its function (with layers: the tag is SAM's layered one, the image is FROM
/// the per-function image and runs through the RIE; without: the tag's repository is the
/// per-function image's), and another function gets the global one.
#[tokio::test(flavor = "multi_thread")]
async fn a_per_function_invoke_image_beats_the_global_one() {
    let prefix = unique("invoke");
    let global = format!("lambda-imaged-test/{prefix}-global:1");
    let per_function = format!("lambda-imaged-test/{prefix}-function:1");
    for (image, marker) in [(&global, "global"), (&per_function, "function")] {
        docker_build(
            image,
            "FROM public.ecr.aws/lambda/python:3.12-x86_64\nCOPY marker /marker\n",
            &[("marker", marker, 0o644)],
        );
    }
    let daemon = TestDaemon::start().await;
    let dir = tempfile::tempdir().unwrap();
    let layer = dir.path().join("layer");
    write_file(&layer.join("bootstrap"), &bootstrap_fixture(), 0o755);
    write_file(&layer.join("message.txt"), "from the layer", 0o644);
    let layer_name = unique("layer");
    let request = |function: &str, layers: bool| {
        let builder = RequestBuilder::zip("python3.12")
            .function_name(function)
            .skip_pull_image(true)
            .invoke_image(InvokeImageArg {
                function: None,
                image: global.clone(),
            })
            .invoke_image(InvokeImageArg {
                function: Some("fn".into()),
                image: per_function.clone(),
            });
        let builder = if layers {
            builder.layer(LayerArg::new(&layer_name, &layer))
        } else {
            builder
        };
        builder.finish().unwrap()
    };

    let plan = Client::connect(&daemon.socket)
        .await
        .unwrap()
        .resolve(request("fn", true))
        .await
        .unwrap();
    assert_eq!(plan.base_image, per_function);
    let layered = build(&daemon.socket, request("fn", true)).await;
    let layered = layered.completed().clone();
    assert_eq!(
        layered.tag,
        sam_layered_tag("python:3.12-x86_64", &[&layer_name])
    );
    assert_eq!(run_in_image(&layered.tag, "cat /marker"), "function");
    assert_eq!(
        invoke_through_rie(&layered.tag).await,
        r#"{"echo":{"ping":1},"layer":"from the layer"}"#
    );

    let bare = build(&daemon.socket, request("fn", false)).await;
    let bare = bare.completed().clone();
    assert_eq!(
        bare.tag,
        format!("lambda-imaged-test/{prefix}-function:rapid-x86_64")
    );
    assert_eq!(run_in_image(&bare.tag, "cat /marker"), "function");

    let other = build(&daemon.socket, request("other", false)).await;
    let other = other.completed().clone();
    assert_eq!(
        other.tag,
        format!("lambda-imaged-test/{prefix}-global:rapid-x86_64")
    );
    assert_eq!(run_in_image(&other.tag, "cat /marker"), "global");

    daemon.stop().await;
    for tag in [&layered.tag, &bare.tag, &other.tag, &global, &per_function] {
        docker(&["rmi", tag]);
    }
}
