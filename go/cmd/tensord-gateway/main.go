// Command tensord-gateway serves the models of a tensord daemon over the Open Inference
// Protocol (KServe v2): HTTP/REST with JSON tensors and Triton's binary tensor extension,
// and the KServe v2 gRPC service (inference.GRPCInferenceService). Any language, on this host
// or over the network, calls a model without writing a server; Triton's clients
// (tritonclient.http, tritonclient.grpc) work as they are.
//
//	tensord-gateway [-socket PATH] [-http :8000] [-grpc :8001]
//
//	curl localhost:8000/v2/health/ready
//	curl localhost:8000/v2/models/mlp
//	curl -d '{"inputs":[{"name":"x","shape":[1,16],"datatype":"FP32","data":[0,1,...]}]}' \
//	     localhost:8000/v2/models/mlp/infer
//
// One tensord session (one shmclient.Client) carries every request; tensors cross to the
// daemon through its shared-memory rings. The gateway reconnects when the daemon restarts:
// /v2/health/ready (and gRPC ServerReady) say whether it is connected, and requests made
// while it is not get 503 / UNAVAILABLE. A request's deadline is its HTTP or gRPC context
// (a client that goes away cancels it), the protocol's "timeout" parameter (microseconds)
// and -timeout, whichever ends first; the daemon is told the deadline too. Daemon errors
// map to status codes: BAD_INPUT 400 / INVALID_ARGUMENT, UNKNOWN_MODEL 404 / NOT_FOUND,
// TOO_LARGE 413 / RESOURCE_EXHAUSTED, DEADLINE 504 / DEADLINE_EXCEEDED, OVERLOADED and a
// missing daemon 503 / UNAVAILABLE, MODEL_FAILED 500 / INTERNAL. On SIGINT or SIGTERM it
// stops being ready, finishes the requests in flight (up to -shutdown-timeout) and exits.
//
// Listen addresses are host:port, or unix:/path for a Unix socket.
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
	"strings"
	"syscall"
	"time"

	"github.com/tensord/tensord/go/cmd/tensord-gateway/pb"
	"github.com/tensord/tensord/go/shmclient"
	"google.golang.org/grpc"
)

func main() {
	socket := flag.String("socket", "", "tensord socket (default: $TENSORD_SOCKET, /run/tensord/tensord.sock or /tmp/tensord.sock)")
	httpAddr := flag.String("http", ":8000", "HTTP/REST listen address (host:port or unix:/path); empty: none")
	grpcAddr := flag.String("grpc", ":8001", "gRPC listen address (host:port or unix:/path); empty: none")
	timeout := flag.Duration("timeout", 5*time.Minute, "longest time a request may take; 0: no limit")
	maxBody := flag.Int64("max-body", 256<<20, "largest request body or gRPC message, in bytes")
	ring := flag.Int("ring", 64<<20, "request and response ring size of the daemon session, in bytes")
	shutdown := flag.Duration("shutdown-timeout", 30*time.Second, "on SIGTERM, how long requests in flight may take to finish")
	spin := flag.Duration("spin", 0, "poll the daemon's rings this long before sleeping (lower latency for a CPU core; see bench/README.md)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	opts := []shmclient.Option{shmclient.WithName("tensord-gateway"), shmclient.WithRingSize(*ring, *ring), shmclient.WithSpin(*spin)}
	if err := run(log, *socket, *httpAddr, *grpcAddr, *timeout, *maxBody, opts, *shutdown); err != nil {
		log.Error("tensord-gateway", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, socket, httpAddr, grpcAddr string, timeout time.Duration, maxBody int64, opts []shmclient.Option, shutdownTimeout time.Duration) error {
	if httpAddr == "" && grpcAddr == "" {
		return errors.New("nothing to serve: give -http, -grpc or both")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	d := newDaemon(socket, log, opts...)
	dctx, stopDaemon := context.WithCancel(context.Background())
	defer stopDaemon()
	daemonDone := make(chan struct{})
	go func() { d.run(dctx); close(daemonDone) }()
	g := &gateway{b: d, log: log, maxTimeout: timeout, maxBody: maxBody}

	errc := make(chan error, 2)
	var hs *http.Server
	if httpAddr != "" {
		ln, err := listen(httpAddr)
		if err != nil {
			return err
		}
		hs = &http.Server{Handler: g.routes(), ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 5 * time.Minute,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		log.Info("serving the Open Inference Protocol over HTTP", "addr", ln.Addr().String())
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
		gs = grpc.NewServer(grpc.MaxRecvMsgSize(int(maxBody)), grpc.MaxSendMsgSize(int(maxBody)))
		pb.RegisterGRPCInferenceServiceServer(gs, &grpcService{g: g})
		log.Info("serving the Open Inference Protocol over gRPC", "addr", ln.Addr().String())
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
	stopDaemon()
	<-daemonDone
	return err
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
