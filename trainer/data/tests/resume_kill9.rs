//! `fusechat sample` killed with SIGKILL mid-run, twice, then run to the
//! end: every (prompt, source, index) is in the store exactly once, and the
//! mock server saw a key again only if it was in flight at a kill.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fusechat_data::store::Store;

fn keys(store: &Store) -> HashSet<String> {
    store
        .samples()
        .unwrap()
        .into_iter()
        .filter(|s| s.ok)
        .map(|s| format!("fusechat-data/{}/{}/{}", s.prompt_id, s.source, s.idx))
        .collect()
}

#[test]
fn kill_9_mid_run_loses_nothing_and_samples_nothing_twice() {
    let bin = common::require_bin();
    let dir = tempfile::tempdir().unwrap();
    common::math_pool(dir.path(), 30);
    let mock = common::mock(Duration::from_millis(150));
    let cfg = dir.path().join("data.toml");
    std::fs::write(
        &cfg,
        common::mock_math_config(
            dir.path(),
            &mock.base_url(),
            4,
            r#"
[[sources]]
id = "good"
endpoint = "mock"
[[sources]]
id = "other"
endpoint = "mock"
model = "good"
[sampling]
n = { math = 2 }
progress = false
"#,
        ),
    )
    .unwrap();
    let total = 30 * 2 * 2;
    let store_path = dir.path().join("out/store.sqlite");
    let run = || {
        Command::new(&bin)
            .args(["sample", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    let mut stored_at_kill: Vec<HashSet<String>> = Vec::new();
    let mut seen_at_kill: Vec<usize> = Vec::new();
    for kill_after in [25, 70] {
        let mut child = run();
        let deadline = Instant::now() + Duration::from_secs(60);
        while mock.count() < kill_after {
            assert!(
                Instant::now() < deadline,
                "the sampler made too few requests"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the sampler ended before the kill"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        seen_at_kill.push(mock.count());
        let store = Store::open(&store_path).unwrap(); // quick_check passes
        let k = keys(&store);
        assert!(k.len() < total, "the run finished before the kill");
        stored_at_kill.push(k);
    }
    let status = run().wait().unwrap();
    assert!(status.success());

    let store = Store::open(&store_path).unwrap();
    let (rows, distinct) = store.sample_counts().unwrap();
    assert_eq!((rows as usize, distinct as usize), (total, total));
    assert_eq!(keys(&store).len(), total);

    // What the mock saw: a key twice only if it was in flight at a kill
    // (requested before the kill, not stored at the kill), never three times,
    // never after it was stored.
    let users = mock.users();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for u in &users {
        *count.entry(u.as_str()).or_default() += 1;
    }
    assert_eq!(count.len(), total);
    // How many kills found each key in flight (requested, not yet stored).
    let mut in_flight: HashMap<&str, usize> = HashMap::new();
    for (i, &seen) in seen_at_kill.iter().enumerate() {
        let before: HashSet<&str> = users[..seen].iter().map(String::as_str).collect();
        for k in before {
            if !stored_at_kill[i].contains(k) {
                *in_flight.entry(k).or_default() += 1;
            }
        }
        for u in &users[seen..] {
            assert!(
                !stored_at_kill[i].contains(u),
                "{u} was stored before kill {i} and requested again"
            );
        }
    }
    for (k, n) in &count {
        let allowed = 1 + in_flight.get(k).copied().unwrap_or(0);
        assert!(
            *n <= allowed,
            "{k} requested {n} times, in flight at {} kill(s)",
            allowed - 1
        );
    }
    let doubled = count.values().filter(|n| **n > 1).count();
    eprintln!(
        "stored at the kills: {:?}, requests seen at the kills: {seen_at_kill:?}, in flight: {}, requested again: {doubled}, requests in all: {}",
        stored_at_kill.iter().map(HashSet::len).collect::<Vec<_>>(),
        in_flight.len(),
        users.len()
    );
    assert_eq!(users.len(), count.values().sum::<usize>());
    assert!(doubled > 0 || in_flight.is_empty());
}
