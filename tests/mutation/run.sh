#!/usr/bin/env bash
# Mutation check: applies each mutation of tests/mutation/mutations.txt to a scratch copy of the
# tree, rebuilds the tests that should catch it, runs them, and reports which mutants the suite
# caught and which survived (README.md beside this file).
#
#   tests/mutation/run.sh                          every mutation
#   tests/mutation/run.sh --only ID[,ID...]        the named ones
#   tests/mutation/run.sh --sample N --seed S      N drawn at random (the same N for the same S)
#   tests/mutation/run.sh --check                  only check that each mutation applies exactly once
#
# Options: --budget-s T (start no mutant after T seconds; the rest are "not run"), --timeout S
# (per ctest run, default 300), --work DIR (scratch: source copy + build; default build-mutation/
# at the repository root, or $SPEED_MUTATION_WORK), --list FILE, --fresh (copy and configure anew).
#
# Exit: 0 every mutant run was caught, 1 one survived, 2 bad usage / a mutation that does not
# apply / the scratch build or a clean test set could not be prepared.
set -uo pipefail

# The whole script is one group, read before it runs: editing this file during a long run is safe.
{
root=$(cd "$(dirname "$0")/../.." && pwd)
list=$root/tests/mutation/mutations.txt
work=${SPEED_MUTATION_WORK:-$root/build-mutation}
only="" sample=0 seed=1 budget=0 timeout=300 check=0 fresh=0

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
    --only) only="${only:+$only,}$2"; shift ;;
    --sample) sample=$2; shift ;;
    --seed) seed=$2; shift ;;
    --budget-s) budget=$2; shift ;;
    --timeout) timeout=$2; shift ;;
    --work) work=$2; shift ;;
    --list) list=$2; shift ;;
    --check) check=1 ;;
    --fresh) fresh=1 ;;
    -h | --help) usage ;;
    *) echo "mutation: unknown argument '$1'" >&2; usage ;;
    esac
    shift
done
[ -r "$list" ] || { echo "mutation: cannot read $list" >&2; exit 2; }

t_start=$(date +%s)

# ---- the list: blocks of "key: value" -> one tab-separated record per mutation ----------------
# Fields: id, file, find, replace, breaks, tests, joined by \x1f (a separator bash's read does not
# collapse, so an empty replacement stays a field). A value holding a tab is refused.
records=$(perl -e '
    use strict;
    my (%m, @out, $bad);
    my @keys = qw(id file find replace breaks tests);
    sub flush {
        return unless %m;
        for my $k (@keys) {
            next if $k eq "replace" && exists $m{$k};
            if (!defined $m{$k} || $m{$k} eq "") { print STDERR "mutation list: block at line $m{_line}: no $k\n"; $bad = 1; }
        }
        push @out, join("\x1f", map { $m{$_} // "" } @keys) . "\n";
        %m = ();
    }
    while (my $l = <>) {
        chomp $l;
        if ($l =~ /^\s*$/) { flush(); next; }
        next if $l =~ /^#/;
        if ($l =~ /^(id|file|find|replace|breaks|tests):(?: (.*))?$/) {
            my ($k, $v) = ($1, $2 // "");
            $m{_line} //= $.;
            if (exists $m{$k}) { print STDERR "mutation list: line $.: $k given twice\n"; $bad = 1; }
            if ($v =~ /\t/) { print STDERR "mutation list: line $.: a tab in the value\n"; $bad = 1; }
            $m{$k} = $v;
        } else {
            print STDERR "mutation list: line $.: not \"key: value\": $l\n"; $bad = 1;
        }
    }
    flush();
    my %seen;
    for (@out) { my ($id) = split /\x1f/; if ($seen{$id}++) { print STDERR "mutation list: id $id twice\n"; $bad = 1; } }
    exit 1 if $bad;
    print @out;
' "$list") || exit 2

ids=() files=() finds=() repls=() breaks=() regexes=()
while IFS=$'\x1f' read -r id file find repl brk rx; do
    ids+=("$id") files+=("$file") finds+=("$find") repls+=("$repl") breaks+=("$brk") regexes+=("$rx")
done <<<"$records"
n_all=${#ids[@]}

# ---- selection ------------------------------------------------------------------------------
sel=()
if [ -n "$only" ]; then
    IFS=, read -r -a want <<<"$only"
    for w in "${want[@]}"; do
        found=0
        for i in "${!ids[@]}"; do [ "${ids[$i]}" = "$w" ] && sel+=("$i") && found=1; done
        [ $found -eq 1 ] || { echo "mutation: no mutation named '$w'" >&2; exit 2; }
    done
elif [ "$sample" -gt 0 ]; then
    # A seeded draw (Fisher-Yates on perl's seeded generator): the same seed picks the same
    # mutations from the same list.
    mapfile -t sel < <(perl -e 'my ($n, $k, $seed) = @ARGV; srand($seed); my @a = (0 .. $n - 1);
        for (my $i = $#a; $i > 0; $i--) { my $j = int(rand($i + 1)); @a[$i, $j] = @a[$j, $i]; }
        $k = $n if $k > $n; print "$_\n" for @a[0 .. $k - 1];' "$n_all" "$sample" "$seed")
else
    sel=("${!ids[@]}")
fi

# ---- each mutation must apply exactly once -----------------------------------------------------
count_in() { # file text -> occurrences
    perl -e 'my ($f, $t) = @ARGV; local $/; open my $h, "<", $f or exit 3; my $s = <$h>;
             my $n = 0; my $p = 0; while (($p = index($s, $t, $p)) >= 0) { $n++; $p += length $t; } print $n' "$1" "$2"
}
refused=0
for i in "${sel[@]}"; do
    f=$root/${files[$i]}
    if [ ! -f "$f" ]; then
        echo "mutation ${ids[$i]}: REFUSED: no file ${files[$i]}" >&2
        refused=$((refused + 1))
        continue
    fi
    n=$(count_in "$f" "${finds[$i]}")
    if [ "$n" != 1 ]; then
        echo "mutation ${ids[$i]}: REFUSED: its text is found $n times in ${files[$i]} (must be exactly once): ${finds[$i]}" >&2
        refused=$((refused + 1))
    fi
    if [ "${finds[$i]}" = "${repls[$i]}" ]; then
        echo "mutation ${ids[$i]}: REFUSED: the replacement is the text itself" >&2
        refused=$((refused + 1))
    fi
done
if [ $refused -gt 0 ]; then
    echo "mutation: $refused of ${#sel[@]} mutations do not apply; fix $list" >&2
    exit 2
fi
if [ $check -eq 1 ]; then
    names=""
    [ ${#sel[@]} -lt "$n_all" ] && for i in "${sel[@]}"; do names="$names ${ids[$i]}"; done
    echo "mutation: all ${#sel[@]} mutations apply exactly once ($list)${names:+:$names}"
    exit 0
fi

# ---- scratch tree and build --------------------------------------------------------------------
src=$work/src bld=$work/build logs=$work/logs
mkdir -p "$work" "$logs"
if [ $fresh -eq 1 ]; then rm -rf "$src" "$bld"; fi
# The tree as it is now (committed or not, untracked files included, build dirs and ignored
# files left out), unpacked into $work/incoming and then copied over $src file by file, only
# where the content differs (with a new time stamp): a file that did not change keeps its time
# stamp, so a rebuild is incremental, and a file a mutant touched keeps the time stamp of its
# restore, newer than any object built from the mutant (unpacking the tree over $src would give
# it back an older time stamp, and the build would keep the mutant's object).
echo "== mutation: copying the tree to $src"
incoming=$work/incoming
rm -rf "$incoming"
mkdir -p "$src" "$incoming"
if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$root" && git ls-files -co --exclude-standard -z | tar -c --null -T -) | tar -x -C "$incoming"
else
    (cd "$root" && tar -c --exclude='./build*' --exclude=./.git .) | tar -x -C "$incoming"
fi || { echo "mutation: copying the tree failed" >&2; exit 2; }
(cd "$incoming" && find . -type f -print0) | while IFS= read -r -d '' f; do
    if ! cmp -s "$incoming/$f" "$src/$f"; then
        mkdir -p "$(dirname "$src/$f")" && cp "$incoming/$f" "$src/$f" || exit 1
    fi
done || { echo "mutation: copying the tree failed" >&2; exit 2; }
rm -rf "$incoming"
# installed packages a test needs that git does not hold (deploy/setup.sh: npm ci for the
# manifest validator): linked, so a mutant of the validator runs against them
if [ -d "$root/tools/k8s-validate/node_modules" ] && [ ! -e "$src/tools/k8s-validate/node_modules" ]; then
    ln -s "$root/tools/k8s-validate/node_modules" "$src/tools/k8s-validate/node_modules"
fi

data=${SPEED_TEST_DATA:-}
[ -z "$data" ] && [ -d "$root/../shared/data" ] && data=$(cd "$root/../shared/data" && pwd)
if [ ! -f "$bld/CMakeCache.txt" ]; then
    echo "== mutation: configuring $bld"
    gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    # No -Werror: a mutant that only warns must still build and be tested.
    if ! cmake -S "$src" -B "$bld" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSPEED_CUDA=OFF \
        -DSPEED_WERROR=OFF ${data:+-DSPEED_TEST_DATA="$data"} >"$logs/configure.log" 2>&1; then
        cat "$logs/configure.log"
        echo "mutation: configure failed" >&2
        exit 2
    fi
elif ! cmake "$bld" >"$logs/configure.log" 2>&1; then
    # an existing build: configure again, so tests added since it was made are known to ctest
    # before the build (the test list below is read from it)
    cat "$logs/configure.log"
    echo "mutation: configure failed" >&2
    exit 2
fi

# Test executables of a ctest regex: each test runs a target's binary, named in the
# CTestTestfile.cmake files (ctest -N -V prints a command only once it has been built).
declare -A set_targets set_clean
test_programs() { # regex -> the build's program names of the tests it selects
    local names
    names=$(cd "$bld" && ctest -N -R "$1" 2>/dev/null | sed -n 's/^ *Test *#[0-9]*: \([^ ]*\).*/\1/p')
    [ -n "$names" ] || return 0
    find "$bld" -name CTestTestfile.cmake -print0 | xargs -0 cat |
        perl -ne 'BEGIN { my ($b, @n) = @ARGV; our %want = map { $_ => 1 } split /\n/, $n[0]; our $bld = $b; @ARGV = (); }
                  our (%want, $bld);
                  if (/^add_test\(\[=\[(.+?)\]=\] "([^"]+)"(.*)/ && $want{$1}) {
                      # the test program when the build makes it, and programs of the build passed
                      # to it (a script run by /usr/bin/python3 that calls bin/speedctl)
                      my ($cmd, $rest) = ($2, $3);
                      my @p = index($cmd, "$bld/") == 0 ? ($cmd) : ();
                      push @p, grep { index($_, "$bld/bin/") == 0 } $rest =~ /"([^"]+)"/g;
                      for my $p (@p) { $p =~ s{.*/}{}; print "$p\n"; } }' "$bld" "$names" | sort -u | tr '\n' ' '
}
for i in "${sel[@]}"; do
    rx=${regexes[$i]}
    [ -n "${set_targets[$rx]+x}" ] && continue
    t=$(test_programs "$rx")
    if [ -z "$t" ]; then
        echo "mutation: the regex '$rx' (mutation ${ids[$i]}) selects no test" >&2
        exit 2
    fi
    set_targets[$rx]=$t
done

cur_file="" cur_orig=""
restore() {
    if [ -n "$cur_file" ]; then
        # A fresh time stamp: the build must see the file changed back.
        cp "$cur_orig" "$cur_file" && rm -f "$cur_orig"
        cur_file="" cur_orig=""
    fi
}
trap 'restore; exit 130' INT TERM
trap 'restore' EXIT

build_targets() { # log, targets...
    local log=$1
    shift
    cmake --build "$bld" -j2 --target "$@" >"$log" 2>&1
}

run_set() { # regex, log -> 0 all passed, 1 a test failed, 3 nothing ran (all skipped)
    local rx=$1 log=$2
    (cd "$bld" && ctest -R "$rx" -j2 --timeout "$timeout" --output-on-failure) >"$log" 2>&1
    local rc=$?
    if [ $rc -eq 0 ] && grep -q "tests passed, 0 tests failed out of" "$log" && grep -q "Skipped" "$log" &&
        ! grep -q "Passed" "$log"; then
        return 3
    fi
    [ $rc -eq 0 ] && return 0
    return 1
}

all_targets=$(printf '%s\n' "${set_targets[@]}" | tr ' ' '\n' | sed '/^$/d' | sort -u | tr '\n' ' ')
echo "== mutation: building the clean tree ($(echo $all_targets | wc -w) test programs)"
# shellcheck disable=SC2086
if ! build_targets "$logs/clean.build.log" $all_targets; then
    tail -40 "$logs/clean.build.log"
    echo "mutation: the clean tree does not build" >&2
    exit 2
fi
# A set that fails on the clean tree would "catch" every mutant: its mutants are not counted.
n_set=0
for rx in "${!set_targets[@]}"; do
    n_set=$((n_set + 1))
    run_set "$rx" "$logs/clean.$n_set.test.log"
    case $? in
    0) set_clean[$rx]=ok ;;
    3) set_clean[$rx]=skipped; echo "   clean: '$rx' skips (no data?): its mutants are not counted" ;;
    *) set_clean[$rx]=fails; echo "   clean: '$rx' FAILS on the clean tree ($logs/clean.$n_set.test.log): its mutants are flaky, not counted" ;;
    esac
done

# ---- the mutants ---------------------------------------------------------------------------------
results=() times=()
n_caught=0 n_build=0 n_surv=0 n_flaky=0 n_notrun=0
for i in "${sel[@]}"; do
    id=${ids[$i]} rx=${regexes[$i]}
    if [ "$budget" -gt 0 ] && [ $(($(date +%s) - t_start)) -ge "$budget" ]; then
        results[$i]="not run (budget)"
        times[$i]=0
        n_notrun=$((n_notrun + 1))
        continue
    fi
    if [ "${set_clean[$rx]}" != ok ]; then
        results[$i]="flaky, not counted (tests ${set_clean[$rx]} clean)"
        times[$i]=0
        n_flaky=$((n_flaky + 1))
        continue
    fi
    t0=$(date +%s)
    cur_file=$src/${files[$i]} cur_orig=$work/orig.$id
    cp -p "$cur_file" "$cur_orig"
    perl -e 'my ($f, $t, $r) = @ARGV; local $/; open my $h, "<", $f or die; my $s = <$h>; close $h;
             my $p = index($s, $t); die "not found\n" if $p < 0; substr($s, $p, length $t) = $r;
             open $h, ">", $f or die; print $h $s; close $h' "$cur_file" "${finds[$i]}" "${repls[$i]}" ||
        { echo "mutation: applying $id failed" >&2; exit 2; }
    # shellcheck disable=SC2086
    if ! build_targets "$logs/$id.build.log" ${set_targets[$rx]}; then
        results[$i]="caught at build"
        n_build=$((n_build + 1))
    else
        run_set "$rx" "$logs/$id.test.log"
        case $? in
        0) results[$i]="SURVIVED"; n_surv=$((n_surv + 1)) ;;
        3) results[$i]="flaky, not counted (tests skipped)"; n_flaky=$((n_flaky + 1)) ;;
        *) results[$i]="caught"; n_caught=$((n_caught + 1)) ;;
        esac
    fi
    restore
    times[$i]=$(($(date +%s) - t0))
    printf '   %-40s %-18s %4ss  %s\n' "$id" "${results[$i]}" "${times[$i]}" "$rx"
done

# ---- report --------------------------------------------------------------------------------------
echo
printf '%-40s %-18s %6s  %s\n' "mutation" "result" "time" "tests (ctest -R)"
for i in "${sel[@]}"; do
    printf '%-40s %-18s %5ss  %s\n' "${ids[$i]}" "${results[$i]}" "${times[$i]}" "${regexes[$i]}"
done
for i in "${sel[@]}"; do
    [ "${results[$i]}" = SURVIVED ] && echo "survived: ${ids[$i]} (${files[$i]}): ${breaks[$i]}"
done
echo "mutation: ${#sel[@]} mutants: $((n_caught + n_build)) caught ($n_build at build), $n_surv survived," \
    "$n_flaky not counted (flaky or skipped clean), $n_notrun not run (budget); $(($(date +%s) - t_start)) s;" \
    "logs in $logs"
[ $n_surv -eq 0 ]
exit $?
}
