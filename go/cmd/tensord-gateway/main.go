// Command tensord-gateway serves the models of a tensord daemon over the Open Inference
// Protocol (KServe v2): HTTP/REST with JSON tensors and Triton's binary tensor extension,
// and the KServe v2 gRPC service (inference.GRPCInferenceService). Any language, on this host
// or over the network, calls a model without writing a server; Triton's clients
// (tritonclient.http, tritonclient.grpc) work as they are.
//
//	tensord-gateway [-socket PATH] [-http 127.0.0.1:8000] [-grpc 127.0.0.1:8001]
//
//	curl localhost:8000/v2/health/ready
//	curl localhost:8000/v2/models/mlp
//	curl -d '{"inputs":[{"name":"x","shape":[1,16],"datatype":"FP32","data":[0,1,...]}]}' \
//	     localhost:8000/v2/models/mlp/infer
//
// One tensord session (one shmclient.Client) carries every request; tensors cross to the
// daemon through its shared-memory rings. The gateway may start before the daemon, and
// reconnects when the daemon restarts: /v2/health/ready (and gRPC ServerReady) say whether
// it is connected; a request made while it is not waits for the daemon for up to -hold
// (and its own deadline), then gets 503 / UNAVAILABLE. A request the restart kept from
// running is sent to the new daemon, and one to an idempotent model that may have run is
// sent again once. A request's deadline is its HTTP or gRPC context (a client that goes
// away cancels it), the protocol's "timeout" parameter (microseconds) and -timeout,
// whichever ends first; the daemon is told the deadline too. Errors map to status codes as
// shmclient.HTTPStatus and shmclient.GRPCCode say: BAD_INPUT 400 / INVALID_ARGUMENT,
// UNKNOWN_MODEL 404 / NOT_FOUND, TOO_LARGE 413 / RESOURCE_EXHAUSTED, OVERLOADED 429 /
// RESOURCE_EXHAUSTED, DEADLINE 504 / DEADLINE_EXCEEDED, a missing daemon 503 / UNAVAILABLE,
// MODEL_FAILED 500 / INTERNAL; every answer, unknown routes included, is the protocol's JSON.
// On SIGINT or SIGTERM it stops being ready, finishes the requests in flight (up to
// -shutdown-timeout) and exits.
//
// Memory a client can make it hold is bounded: request bodies (decompressed) are read
// incrementally against one budget for the whole gateway (-max-inflight; past it 429), one
// body may be at most -max-body (413, refused from its Content-Length when that says so),
// must arrive within -body-timeout (408) after headers that arrive within 10 s.
//
// Listen addresses are host:port, or unix:/path for a Unix socket. The defaults listen on
// loopback only: the gateway has no TLS and no authentication of its own. To serve other
// hosts, put a reverse proxy that terminates TLS and authenticates (nginx, Envoy, a
// Kubernetes ingress) in front of it, or pass -http :8000 / -grpc :8001 yourself on a
// network you trust.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/tensord/tensord/go/shmclient"
	"google.golang.org/grpc"
)

func main() {
	socket := flag.String("socket", "", "tensord socket (default: $TENSORD_SOCKET, /run/tensord/tensord.sock or /tmp/tensord.sock)")
	httpAddr := flag.String("http", "127.0.0.1:8000", "HTTP/REST listen address (host:port or unix:/path); empty: none. No TLS or auth: expose it through a proxy that has them")
	grpcAddr := flag.String("grpc", "127.0.0.1:8001", "gRPC listen address (host:port or unix:/path); empty: none. No TLS or auth: expose it through a proxy that has them")
	timeout := flag.Duration("timeout", 5*time.Minute, "longest time a request may take; 0: no limit")
	maxBody := flag.Int64("max-body", 64<<20, "largest request body (decompressed) or gRPC message, in bytes")
	maxInflight := flag.Int64("max-inflight", 256<<20, "request body bytes the gateway holds at once, all requests together; past it, 429")
	bodyTimeout := flag.Duration("body-timeout", time.Minute, "longest a request body may take to arrive; 0: no limit")
	hold := flag.Duration("hold", 30*time.Second, "longest a request waits for the daemon while the gateway reconnects (a restart), within its own deadline; 0: answer 503 at once")
	ring := flag.Int("ring", 64<<20, "request and response ring size of the daemon session, in bytes")
	shutdown := flag.Duration("shutdown-timeout", 30*time.Second, "on SIGTERM, how long requests in flight may take to finish")
	spin := flag.Duration("spin", 0, "poll the daemon's rings this long before sleeping (lower latency for a CPU core; see bench/README.md)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	opts := []shmclient.Option{shmclient.WithName("tensord-gateway"), shmclient.WithRingSize(*ring, *ring), shmclient.WithSpin(*spin)}
	lim := limits{timeout: *timeout, maxBody: *maxBody, maxInflight: *maxInflight, bodyTimeout: *bodyTimeout, hold: *hold}
	if err := run(log, *socket, *httpAddr, *grpcAddr, lim, opts, *shutdown); err != nil {
		log.Error("tensord-gateway", "err", err)
		os.Exit(1)
	}
}

// limits are the flags that bound what a request may take.
type limits struct {
	timeout, bodyTimeout, hold time.Duration
	maxBody, maxInflight       int64
}

func run(log *slog.Logger, socket, httpAddr, grpcAddr string, lim limits, opts []shmclient.Option, shutdownTimeout time.Duration) error {
	if httpAddr == "" && grpcAddr == "" {
		return errors.New("nothing to serve: give -http, -grpc or both")
	}
	if lim.maxInflight < lim.maxBody {
		return fmt.Errorf("-max-inflight %d is smaller than -max-body %d: no request of the largest size could be read", lim.maxInflight, lim.maxBody)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		// Let the collector work harder as the heap nears what the bodies may hold, so the
		// process's memory follows the budget instead of twice it (GOGC's default growth).
		debug.SetMemoryLimit(lim.maxInflight + 16<<20)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	d := newDaemon(socket, log, lim.hold, opts...)
	if err := d.dial(ctx); err != nil {
		return err
	}
	defer d.close()
	g := &gateway{b: d, log: log, maxTimeout: lim.timeout, maxBody: lim.maxBody,
		inflight: &budget{limit: lim.maxInflight}, bodyTimeout: lim.bodyTimeout}

	errc := make(chan error, 2)
	var hs *http.Server
	if httpAddr != "" {
		ln, err := listen(httpAddr)
		if err != nil {
			return err
		}
		hs = &http.Server{Handler: g.routes(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute,
			MaxHeaderBytes: 64 << 10, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		log.Info("serving the Open Inference Protocol over HTTP", "addr", ln.Addr().String())
		warnExposed(log, ln)
		go func() {
			if err := hs.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("HTTP: %w", err)
			}
		}()
	}
	var gs *grpc.Server
	if grpcAddr != "" {
		ln, err := listen(grpcAddr)
		if err != nil {
			return err
		}
		gs = newGRPCServer(g)
		log.Info("serving the Open Inference Protocol over gRPC", "addr", ln.Addr().String())
		warnExposed(log, ln)
		go func() {
			if err := gs.Serve(ln); err != nil {
				errc <- fmt.Errorf("gRPC: %w", err)
			}
		}()
	}

	var err error
	select {
	case <-ctx.Done():
		log.Info("shutting down: finishing the requests in flight", "timeout", shutdownTimeout)
	case err = <-errc:
	}
	g.draining.Store(true) // not ready, and new requests are refused
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	if hs != nil {
		if e := hs.Shutdown(sctx); e != nil {
			log.Warn("HTTP requests still running at the shutdown timeout", "err", e)
			hs.Close()
		}
	}
	if gs != nil {
		stopped := make(chan struct{})
		go func() { gs.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-sctx.Done():
			log.Warn("gRPC requests still running at the shutdown timeout")
			gs.Stop()
		}
	}
	return err
}

// warnExposed says so when a listener takes connections from other hosts: the gateway has
// no TLS and no authentication.
func warnExposed(log *slog.Logger, ln net.Listener) {
	if a, ok := ln.Addr().(*net.TCPAddr); ok && !a.IP.IsLoopback() {
		log.Warn("listening beyond loopback without TLS or authentication: anyone who can reach this address can run every model; put a proxy with TLS and auth in front", "addr", a.String())
	}
}

// listen opens host:port (TCP) or unix:/path.
func listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(path) // a stale socket of an earlier run
		}
		return net.Listen("unix", path)
	}
	return net.Listen("tcp", addr)
}
