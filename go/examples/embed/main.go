// Command embed ranks sentences by meaning: it embeds a query and the sentences with a
// model served by the daemon's built-in text.embed handler (the example all-MiniLM-L6-v2,
// or any model configured with source = "text.embed") and prints the sentences by cosine
// similarity to the query, most similar first. The daemon tokenizes; this program sends
// strings. Without arguments it uses a built-in query and sentences.
//
//	.venv/bin/tensord serve --config daemon/tensord/examples/models.toml
//	go run ./examples/embed [-socket PATH] [-query TEXT] [-file LINES.txt] [sentence ...]
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"math"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

var defaultSentences = []string{
	"Someone is strumming an acoustic guitar on stage.",
	"A musician performs a song for the crowd.",
	"A child is learning to play the violin.",
	"The chef is slicing onions in the kitchen.",
	"A cat sleeps on the warm windowsill.",
	"Stock markets fell sharply after the announcement.",
}

func main() {
	socket := flag.String("socket", "", "daemon socket (default: $TENSORD_SOCKET, /run/tensord/tensord.sock or /tmp/tensord.sock)")
	model := flag.String("model", "minilm", "name of the embedding model in the daemon's config")
	query := flag.String("query", "A man is playing a guitar.", "the text to rank the sentences against")
	file := flag.String("file", "", "read the sentences from this file, one per line (after any given as arguments)")
	timeout := flag.Duration("timeout", time.Minute, "time limit for connecting and embedding")
	flag.Parse()
	log.SetFlags(0)

	sentences := flag.Args()
	if *file != "" {
		lines, err := readLines(*file)
		if err != nil {
			log.Fatalf("embed: %v", err)
		}
		sentences = append(sentences, lines...)
	}
	if len(sentences) == 0 {
		sentences = defaultSentences
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	c, err := shmclient.Dial(ctx, *socket, shmclient.WithName("embed"))
	if err != nil {
		log.Fatalf("embed: %v", err)
	}
	defer c.Close()

	// One request: the query is text 0, the sentences follow.
	texts := append([]string{*query}, sentences...)
	input := shmclient.FromStrings("text", nil, texts)
	if err := check(ctx, c, *model, input); err != nil {
		log.Fatalf("embed: %v", err)
	}
	out, err := c.Infer(ctx, *model, input)
	if errors.Is(err, shmclient.ErrUnknownModel) {
		log.Fatalf("embed: %v\n(start the daemon with --config daemon/tensord/examples/models.toml)", err)
	}
	if err != nil {
		log.Fatalf("embed: %v", err)
	}
	if len(out) != 1 || len(out[0].Shape) != 2 || out[0].Shape[0] != int64(len(texts)) {
		log.Fatalf("embed: expected one embedding per text, got %d outputs", len(out))
	}
	dim := int(out[0].Shape[1])
	emb := out[0].Float32s()
	q := emb[:dim]

	type ranked struct {
		score    float64
		sentence string
	}
	results := make([]ranked, len(sentences))
	for i, s := range sentences {
		results[i] = ranked{cosine(q, emb[(i+1)*dim:(i+2)*dim]), s}
	}
	sort.SliceStable(results, func(i, j int) bool { return results[i].score > results[j].score })

	fmt.Printf("query: %s\n", *query)
	for _, r := range results {
		fmt.Printf("%7.4f  %s\n", r.score, r.sentence)
	}
}

// check tests the texts against the model's published limits (texts per request, bytes per
// text), when the daemon serves the model (otherwise Infer says it does not).
func check(ctx context.Context, c *shmclient.Client, model string, input shmclient.Tensor) error {
	models, err := c.Models(ctx)
	if err != nil {
		return err
	}
	for i := range models {
		if models[i].Name == model {
			return models[i].Check(input)
		}
	}
	return nil
}

// cosine does not assume unit vectors, so any embedding model can be named with -model.
func cosine(a, b []float32) float64 {
	var dot, na, nb float64
	for i := range a {
		dot += float64(a[i]) * float64(b[i])
		na += float64(a[i]) * float64(a[i])
		nb += float64(b[i]) * float64(b[i])
	}
	if na == 0 || nb == 0 {
		return 0
	}
	return dot / math.Sqrt(na*nb)
}

func readLines(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			lines = append(lines, line)
		}
	}
	return lines, sc.Err()
}
