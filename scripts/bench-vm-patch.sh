#!/usr/bin/env bash
# What the VM patch (vendor/lua-src/PATCHES.md) costs plain Lua: runs the CPU-bound workloads
# of crates/luafcgid-sandbox/examples/support/workloads.rs in plain mlua (no hook, no
# sandbox), built once against the stock Lua of the lua-src crate and once against the
# patched copy in vendor/, and prints both timings (best of RUNS) and their ratio.
#
# The sandbox's own cost on top of the patched VM is measured by
#   cargo run --release -p luafcgid-sandbox --example sandbox_cost
#
# Usage: scripts/bench-vm-patch.sh            (env: RUNS=5, ROUNDS=3)
# Builds in a temporary directory (removed at exit); needs the crates.io registry or a
# populated cargo cache.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-5}
rounds=${ROUNDS:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/luafcgid-vm-patch.XXXXXX")
trap 'rm -rf "$work"' EXIT

lua_src_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/vendor/lua-src/Cargo.toml" | head -n1)
mlua_version=$(sed -n 's/^mlua = { version = "\([^"]*\)".*/\1/p' "$repo/Cargo.toml" | head -n1)

make_project() { # NAME PATCH-SECTION
    local dir="$work/$1"
    mkdir -p "$dir/src"
    cat >"$dir/Cargo.toml" <<EOF
[package]
name = "vm-$1"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
mlua = { version = "$mlua_version", features = ["lua54", "vendored"] }
lua-src = "=$lua_src_version"

[profile.release]
debug = false
$2
EOF
    cat >"$dir/src/main.rs" <<EOF
include!("$repo/crates/luafcgid-sandbox/examples/support/workloads.rs");

fn main() {
    let runs: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    for (name, src) in WORKLOADS {
        let lua = mlua::Lua::new();
        lua.load(*src).exec().unwrap();
        let work: mlua::Function = lua.globals().get("work").unwrap();
        let best = (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                std::hint::black_box(work.call::<mlua::Value>(()).unwrap());
                t.elapsed()
            })
            .min()
            .unwrap();
        println!("{name}\t{}", best.as_secs_f64() * 1e3);
    }
}
EOF
    (cd "$dir" && cargo build --quiet --release)
}

echo "building against the stock Lua of lua-src $lua_src_version ..." >&2
make_project stock ""
echo "building against the patched Lua in vendor/lua-src ..." >&2
make_project patched "
[patch.crates-io]
lua-src = { path = \"$repo/vendor/lua-src\" }"

less() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a < b) }'; }

# Interleaved rounds; each row keeps the best of all rounds.
declare -A best_stock best_patched
order=()
for ((round = 1; round <= rounds; round++)); do
    while IFS=$'\t' read -r name ms; do
        [[ -v best_stock[$name] ]] || order+=("$name")
        if [[ ! -v best_stock[$name] ]] || less "$ms" "${best_stock[$name]}"; then
            best_stock[$name]=$ms
        fi
    done < <("$work/stock/target/release/vm-stock" "$runs")
    while IFS=$'\t' read -r name ms; do
        if [[ ! -v best_patched[$name] ]] || less "$ms" "${best_patched[$name]}"; then
            best_patched[$name]=$ms
        fi
    done < <("$work/patched/target/release/vm-patched" "$runs")
done

printf '%-34s %12s %12s %7s\n' workload "stock Lua" "patched Lua" ratio
for name in "${order[@]}"; do
    s=${best_stock[$name]}
    p=${best_patched[$name]}
    printf '%-34s %9.1f ms %9.1f ms %6.2fx\n' "$name" "$s" "$p" "$(awk -v a="$p" -v b="$s" 'BEGIN { print a / b }')"
done
