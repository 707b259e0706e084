"""Memory: the daemon's peak resident set size applying one transaction of N rows.

One INSERT ... SELECT of N rows is written on the master (one transaction, so one batch of N
events); each round a new `pyreplica run` process applies it into an empty slave database (slave
names registered before the write, so no round's pruning takes events another round needs). The
peak RSS is the process's VmHWM from /proc, read after the slave holds all N rows.
"""
import time

from .common import DB, applied, median, start_daemon, timed, wait_until

SCHEMA = "CREATE TABLE mem (id bigint PRIMARY KEY, k int NOT NULL, v text NOT NULL)"
BIG = "INSERT INTO mem (id, k, v) SELECT g, g %% 1000, 'one big transaction, row ' || g FROM generate_series(1, %s) g"


def measure(master_cluster, slave_cluster, scale, progress=print):
    master = DB(master_cluster, "memory")
    master.execute(SCHEMA)
    master.install_master()
    master.capture("mem")
    slaves = []
    for r in range(scale.memory_rounds):
        slave = DB(slave_cluster, f"memory{r}")
        slave.execute(SCHEMA)
        master.execute("SELECT pyreplica.register_slave(%s)", (f"memory{r}",))
        slaves.append((f"memory{r}", slave))
    rows = scale.memory_rows
    write_seconds = timed(master, BIG, (rows,))
    expected = master.content("mem")
    master.checkpoint()

    peaks, apply_times = [], []
    for name, slave in slaves:
        start = time.perf_counter()
        with start_daemon(master, slave, name) as daemon:
            wait_until(lambda: applied(slave, name) >= rows, scale.timeout, 0.1, f"{rows} rows applied")
            apply_times.append(time.perf_counter() - start)
            peaks.append(daemon.peak_rss_kib() / 1024)
        if slave.content("mem") != expected:
            raise RuntimeError("the slave differs from the master after the big transaction")
        progress(f"memory: peak RSS {peaks[-1]:.1f} MB applying {rows:,} rows in {apply_times[-1]:.1f} s")

    peak, seconds = median(peaks), median(apply_times)
    label = f"one {rows:,}-row transaction"
    table = [(label, "pyreplica", f"daemon peak RSS {peak:.1f} MB; applied in {seconds:.1f} s "
                                  f"({rows / seconds:,.0f} rows/s; the INSERT on the master took {write_seconds:.1f} s)")]
    return table, {"peak_rss_mb": peak, "big_tx_apply_s": seconds}
